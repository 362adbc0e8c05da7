"""The real training loop (data stream, text features, step, logging) against the bare model step, in one run.

The bare step is benchmarks/train_step.py's (pre-built batch, every caption's text features cached, no data
pipeline). The loop is `vilseg/train.py` on the demo's shards and configuration for --steps optimizer steps, timed
after its first 10 steps (worker start-up and the first batches excluded) and without checkpoints. Its text
features come from the per-caption cache, which starts empty: every caption's first sighting (and most hard
negatives) is encoded by the frozen tower, so the ratio falls as the cache fills over epochs.

    python benchmarks/train_loop.py --steps 60 --out benchmarks/results/train_loop_cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--shards", default="data/demo/train-{000000..000014}.tar")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from vilseg.training.config import load_config
    from vilseg.train import main as train_main

    cfg = load_config(args.config)
    bare_args = argparse.Namespace(model=cfg.model.name, batch=cfg.data.batch_size, n_local=cfg.data.n_local,
                                   steps=20, warmup=3, precision="fp32", threads=torch.get_num_threads(),
                                   negatives=bool(cfg.data.hard_negative_groups),
                                   device="cuda" if torch.cuda.is_available() else "cpu")
    bare = train_step.run_isolated(args.config, bare_args, spec=dict(cfg.objectives))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        train_main(["--config", args.config, f"run.dir={tmp}/run", f"data.shards={args.shards}",
                    f"train.steps={args.steps}", f"train.checkpoint_every={args.steps + 1}", "train.text_subspace=null"])
        wall = time.time() - start
        summary = json.loads((Path(tmp) / "run" / "train_summary.json").read_text())
    loop = summary["seconds_per_step_after_warmup"]
    result = {"config": args.config, "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "steps": args.steps,
              "bare_step_seconds": bare["seconds_per_step"], "loop_step_seconds": loop,
              "loop_over_bare": loop / bare["seconds_per_step"], "text_cache": summary.get("text_cache"),
              "text_encode_seconds_per_step": summary["text_cache"]["encode_seconds"] / args.steps,
              "loop_over_bare_without_text_encoding": (loop - summary["text_cache"]["encode_seconds"] / args.steps)
              / bare["seconds_per_step"],
              "loop_wall_seconds_including_startup_and_export": round(wall, 1)}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
