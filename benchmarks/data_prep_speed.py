"""data_prep overhead: images/s per process of our decode-validate-reencode against a bare PIL loop.

Both loops read the same in-memory JPEG files and write JPEG at the same quality, in one process:
  bare:  Image.open -> load -> convert("RGB") -> save(JPEG)
  ours:  data_prep.process.process (bomb check, decode, EXIF transpose, mode conversion, size/aspect filters,
         caption cleaning, SHA-256 content hash, re-encode)
The two are timed alternately over several rounds and the best round of each is kept (robust to noise).

    python benchmarks/data_prep_speed.py --images 200 --size 640x480 --rounds 5
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the data_prep package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from data_prep.process import Options, RawSample, process  # noqa: E402


def make_images(n: int, width: int, height: int) -> list[bytes]:
    """Smooth gradients plus texture and noise: compresses like photographs rather than like pure noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for _ in range(n):
        phase = rng.uniform(0, 6.28, 3)
        img = np.stack([127 + 100 * np.sin(xx / rng.uniform(20, 80) + phase[c]) * np.cos(yy / rng.uniform(20, 80))
                        for c in range(3)], -1)
        img += rng.normal(0, 8, img.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def bare(files: list[bytes], quality: int) -> int:
    total = 0
    for data in files:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="JPEG", quality=quality)
            total += len(buf.getvalue())
    return total


def ours(files: list[bytes], opts: Options) -> int:
    total = 0
    for i, data in enumerate(files):
        res = process(RawSample(f"k{i}", "bench", data, ["a photo of a thing"]), opts)
        assert res.reason is None, res.reason
        total += len(res.image)
    return total


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    width, height = map(int, args.size.split("x"))
    files = make_images(args.images, width, height)
    opts = Options(quality=args.quality)
    times = {"bare": [], "ours": []}
    for _ in range(args.rounds):
        for name, fn in (("bare", lambda: bare(files, args.quality)), ("ours", lambda: ours(files, opts))):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    result = {"images": args.images, "size": args.size, "quality": args.quality, "machine": platform.machine(),
              "bare_images_per_second": args.images / best["bare"], "ours_images_per_second": args.images / best["ours"],
              "overhead": best["ours"] / best["bare"] - 1}
    print(json.dumps(result, indent=1))
    print(f"bare PIL {result['bare_images_per_second']:.1f} img/s, data_prep {result['ours_images_per_second']:.1f} "
          f"img/s per process: overhead {100 * result['overhead']:.1f}%")
    return result


if __name__ == "__main__":
    main()
