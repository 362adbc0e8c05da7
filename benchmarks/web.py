"""Requests per second of the web demo at 1 and 8 concurrent clients, in one run: the app (`vilseg.web.launch`) on
127.0.0.1, clients through `gradio_client` in threads, each request a synthetic-world scene with its own classes and
threshold. The server and the clients share the machine.

    python benchmarks/web.py --requests 48 --out benchmarks/results/web_cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model folder (default: the demo architecture, random init)")
    parser.add_argument("--requests", type=int, default=48, help="requests per client count")
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--out", default="benchmarks/results/web_cpu.json")
    args = parser.parse_args()
    import gradio_client
    import torch
    from PIL import Image

    from vilseg.data.synthetic import SyntheticWorld
    from vilseg.models import ViLSeg, create_model
    from vilseg.inference import Segmenter
    from vilseg.web import CONCURRENCY, launch

    work = Path(tempfile.mkdtemp(prefix="vilseg-bench-web-"))
    if args.model:
        folder, model = Path(args.model), ViLSeg.from_pretrained(args.model)
    else:
        torch.manual_seed(0)
        folder, model = work / "model", create_model("vilseg-demo")
        model.save_pretrained(folder)
    model.eval()
    world = SyntheticWorld("eval", image_size=256, seed=2)
    images = []
    for i in range(8):
        images.append(work / f"scene{i}.png")
        Image.fromarray(world.scene(i).image).save(images[-1])
    classes = ["red circle, blue square", "green triangle, yellow cross", "blue circle, red square, green cross",
               "yellow square", "red triangle|red wedge, blue cross", "green circle", "blue triangle, yellow circle",
               "red cross, green square"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = launch(Segmenter.from_pretrained(folder), folder, port=port, block=False)
    rows = []
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)

        def ask(i: int):
            return client.predict(gradio_client.handle_file(str(images[i % 8])), classes[i % 8],
                                  "(the classes above)", round(0.1 + 0.05 * (i % 8), 2), api_name="/segment")

        for i in range(8):  # warm-up: every vocabulary embedded once
            ask(i)
        for n in [int(c) for c in args.clients.split(",")]:
            start = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                list(pool.map(ask, range(args.requests)))
            seconds = time.perf_counter() - start
            rows.append({"clients": n, "requests": args.requests, "seconds": round(seconds, 2),
                         "requests_per_s": round(args.requests / seconds, 2)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        app.close()
    report = {"machine": f"{platform.node()} {platform.machine()}, torch {torch.__version__} "
                         f"({torch.get_num_threads()} threads)", "server_concurrency": CONCURRENCY,
              "model": args.model or "vilseg-demo (random init)", "image": "256 px synthetic scenes",
              "command": f"python benchmarks/web.py --requests {args.requests} --clients {args.clients} --out {args.out}"
                         + (f" --model {args.model}" if args.model else ""), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
