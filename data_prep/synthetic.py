"""Writes the synthetic world as webdataset training shards plus an evaluation split with masks.

    python -m data_prep.synthetic --out data/synthetic --train 20000 --eval 300
    python -m data_prep.synthetic --out data/synthetic --text-features configs/demo.yaml   # + text-tower features

Output:
    OUT/train-000000.tar ...    {key}.png, {key}.txt (caption), {key}.json (objects, seed, index)
    OUT/eval/images/{key}.png, OUT/eval/masks/{key}.png (uint8 labels, 0 background), OUT/eval/meta.json
    OUT/calib/...               same layout, training-world scenes (seen classes only), for the background threshold
    OUT/manifest.json           shard list and counts
    OUT/text_features.json      with --text-features: the text tower's identity and the cost (data_prep/text_features.py)
"""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from vilseg.data.synthetic import SyntheticWorld


def _png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_train_shards(out: Path, n: int, per_shard: int, image_size: int, seed: int) -> list[str]:
    import webdataset as wds

    world = SyntheticWorld("train", image_size=image_size, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    # an integer mtime: a float one makes tarfile add a pax header to every member, which doubles the headers that
    # training parses (and a fixed one makes reruns byte-identical)
    with wds.ShardWriter(str(out / "train-%06d.tar"), maxcount=per_shard, verbose=0, mtime=0) as sink:
        for i in tqdm(range(n), desc="train shards", unit="img", mininterval=2, disable=None):
            scene = world.scene(i)
            meta = {"index": i, "seed": seed, "objects": scene.objects, "source": "vilseg.synthetic"}
            sink.write({"__key__": f"{i:08d}", "png": _png(scene.image), "txt": scene.caption,
                        "json": json.dumps(meta)})
    return sorted(p.name for p in out.glob("train-*.tar"))


def write_eval_split(out: Path, n: int, image_size: int, seed: int, split: str = "eval") -> None:
    """Images, label masks and meta.json. ``split="train"`` gives a seen-classes-only calibration split."""
    world = SyntheticWorld(split, image_size=image_size, seed=seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    captions = {}
    for i in tqdm(range(n), desc=f"{out.name} split", unit="img", mininterval=2, disable=None):
        scene = world.scene(i)
        key = f"{i:06d}"
        Image.fromarray(scene.image).save(out / "images" / f"{key}.png")
        Image.fromarray(scene.mask).save(out / "masks" / f"{key}.png")
        captions[key] = scene.caption
    meta = world.metadata()
    meta["captions"] = captions
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=20000, help="training scenes")
    parser.add_argument("--eval", type=int, default=300, help="evaluation scenes (open-world split)")
    parser.add_argument("--calib", type=int, default=100,
                        help="calibration scenes with masks, drawn from the training world (seen classes only)")
    parser.add_argument("--per-shard", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-features", metavar="CONFIG", default=None,
                        help="also store this training config's frozen text-tower features and hard negatives in the "
                             "training shards (python -m data_prep text-features)")
    args = parser.parse_args(argv)
    shards = write_train_shards(args.out, args.train, args.per_shard, args.image_size, args.seed)
    write_eval_split(args.out / "eval", args.eval, args.image_size, args.seed + 1)
    if args.calib:
        write_eval_split(args.out / "calib", args.calib, args.image_size, args.seed + 2, split="train")
    manifest = {"shards": shards, "train_samples": args.train, "eval_samples": args.eval,
                "world": SyntheticWorld("train", image_size=args.image_size, seed=args.seed).describe(),
                "pattern": str(args.out / f"train-{{000000..{len(shards) - 1:06d}}}.tar")}
    if args.text_features:
        from .text_features import add_text_features

        text = add_text_features([str(args.out / s) for s in shards], args.text_features)
        manifest["text_features"] = {k: text[k] for k in ("tower", "model", "negatives_per_caption", "seconds")}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(json.dumps(manifest))
    return args.out


if __name__ == "__main__":
    main()
