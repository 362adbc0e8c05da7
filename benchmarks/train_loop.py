"""The real training loop (data stream, text features, step, logging) against the bare model step, in one run, once
per source of the frozen text tower's features.

The bare step is benchmarks/train_step.py's (pre-built batch, every caption's text features cached, no data
pipeline). Each loop row is `vilseg/train.py` on the demo's configuration for --steps optimizer steps, timed after
its first 10 steps (worker start-up and the first batches excluded) and without checkpoints. Rows, by where the
text features come from (``text_features``):

- ``shards``: the shards hold them (``python -m data_prep text-features``; pass the prepared copy as --text-shards);
- ``cache``: the per-caption cache, empty at the start: every caption's first sighting, and most hard negatives,
  go through the tower (what training without prepared shards costs in its first epoch);
- ``tower``: a cache of one caption, so every caption and negative goes through the tower on every sighting.

Every row is taken at each data-worker niceness of --worker-nice (``data.worker_nice``; 0 is the old behaviour, 19
the CPU default) and in each --precision (bf16: ``train.mixed_precision=bf16``, against a bare step in bf16 too).

The preparation's own cost is measured in the same run: ``data_prep text-features`` on --prep-shards (one shard
by default) into a temporary folder, reported per sample and per 1000 training steps' worth of samples.

    python -m data_prep text-features --config configs/demo.yaml 'data/demo/train-{000000..000014}.tar' \\
        --out data/demo-text
    python benchmarks/train_loop.py --steps 60 --text-shards 'data/demo-text/train-{000000..000014}.tar' \\
        --precision fp32 bf16 --worker-nice 0 19 --out benchmarks/results/train_loop_cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import train_step  # noqa: E402  (this folder is on sys.path when run as a script)


def loop_row(config: str, shards: str, steps: int, source: str, bare_seconds: float, precision: str = "fp32",
             worker_nice: int | None = None) -> dict:
    """One loop row in a fresh process: accelerate's state (its precision above all) is one per process, and every
    row then starts alike."""
    return train_step.in_fresh_process(_loop_row, config, shards, steps, source, bare_seconds, precision, worker_nice)


def _loop_row(config: str, shards: str, steps: int, source: str, bare_seconds: float, precision: str = "fp32",
              worker_nice: int | None = None) -> dict:
    from vilseg.train import main as train_main

    extra = ["train.text_cache_size=1"] if source == "tower" else []
    extra += [f"train.mixed_precision={'no' if precision == 'fp32' else precision}",
              f"data.worker_nice={'null' if worker_nice is None else worker_nice}"]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        train_main(["--config", config, f"run.dir={tmp}/run", f"data.shards={shards}", f"train.steps={steps}",
                    f"train.checkpoint_every={steps + 1}", "train.text_subspace=null",
                    "train.text_subspace_captions=2", *extra])  # the export after the timed steps: kept short
        wall = time.time() - start
        summary = json.loads((Path(tmp) / "run" / "train_summary.json").read_text())
    loop = summary["seconds_per_step_after_warmup"]
    encode = summary["text_cache"]["encode_seconds"] / steps
    return {"text_features": source, "precision": precision, "worker_nice": worker_nice, "shards": shards,
            "bare_step_seconds": bare_seconds, "loop_step_seconds": loop,
            "loop_over_bare": round(loop / bare_seconds, 4), "feature_sources": summary["text_features"],
            "text_cache_hit_rate": summary["text_cache"]["hit_rate"],
            "text_encode_seconds_per_step": round(encode, 4),
            "loop_over_bare_without_text_encoding": round((loop - encode) / bare_seconds, 4),
            "loop_wall_seconds_including_startup_and_export": round(wall, 1)}


def preparation_cost(config: str, shards: list[str], batch_size: int) -> dict:
    from data_prep.text_features import add_text_features

    with tempfile.TemporaryDirectory() as tmp:
        manifest = add_text_features(shards, config, out=tmp, progress=False)
    per_sample = manifest["seconds"] / manifest["samples"]
    return {"shards": shards, "samples": manifest["samples"], "seconds": manifest["seconds"],
            "seconds_encoding": manifest["seconds_encoding"], "texts_encoded": manifest["texts_encoded"],
            "texts_per_second": manifest["texts_per_second"], "seconds_per_sample": round(per_sample, 5),
            "negatives_per_caption": manifest["negatives_per_caption"],
            "seconds_per_1000_steps_of_samples": round(per_sample * 1000 * batch_size, 1)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--shards", default="data/demo/train-{000000..000014}.tar", help="the plain shards")
    parser.add_argument("--text-shards", default=None,
                        help="the same shards with text features (data_prep text-features); without it, no shards row")
    parser.add_argument("--prep-shards", nargs="*", default=["data/demo/train-000000.tar"],
                        help="shards the preparation cost is measured on")
    parser.add_argument("--sources", nargs="*", default=["shards", "cache", "tower"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32"],
                        help="one bare step and one set of loop rows per precision")
    parser.add_argument("--worker-nice", nargs="+", type=int, default=[0, 19],
                        help="the data worker's niceness (data.worker_nice): one loop row per value, side by side")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure the bare step and every loop row this many times, in turn, each in a fresh "
                             "process; each repeat's ratios use its own bare step, and the medians are reported")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from vilseg.training.config import load_config

    cfg = load_config(args.config)
    preparation = preparation_cost(args.config, args.prep_shards, cfg.data.batch_size) if args.prep_shards else None
    trials, bare_seconds = [], {p: [] for p in args.precision}
    for repeat in range(args.repeats):  # in turn, so that a drift of the machine's speed hits every row alike
        for precision in args.precision:
            bare_args = argparse.Namespace(model=cfg.model.name, batch=cfg.data.batch_size, n_local=cfg.data.n_local,
                                           steps=20, warmup=3, precision=precision, threads=torch.get_num_threads(),
                                           negatives=bool(cfg.data.hard_negative_groups), time_only=True,
                                           device="cuda" if torch.cuda.is_available() else "cpu")
            bare = train_step.run_isolated(args.config, bare_args, spec=dict(cfg.objectives))
            bare_seconds[precision].append(bare["seconds_per_step"])
            for source in args.sources:
                if source == "shards" and not args.text_shards:
                    continue
                shards = args.text_shards if source == "shards" else args.shards
                for nice in args.worker_nice:
                    trials.append({"repeat": repeat, **loop_row(args.config, shards, args.steps, source,
                                                                bare["seconds_per_step"], precision, nice)})
                    print(json.dumps({k: trials[-1][k] for k in ("repeat", "precision", "text_features",
                                                                 "worker_nice", "loop_over_bare")}), flush=True)
    rows = []  # one per (precision, source, niceness): the medians over the repeats
    for key in dict.fromkeys((t["precision"], t["text_features"], t["worker_nice"]) for t in trials):
        group = [t for t in trials if (t["precision"], t["text_features"], t["worker_nice"]) == key]
        rows.append({**group[0], **{k: float(np.median([t[k] for t in group])) for k in
                                    ("bare_step_seconds", "loop_step_seconds", "loop_over_bare",
                                     "loop_over_bare_without_text_encoding")},
                     "loop_over_bare_trials": [t["loop_over_bare"] for t in group]})
        rows[-1].pop("repeat")
        print(json.dumps({k: rows[-1][k] for k in ("precision", "text_features", "worker_nice", "loop_step_seconds",
                                                   "loop_over_bare", "loop_over_bare_trials")}), flush=True)
    result = {"config": args.config, "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "steps": args.steps,
              "repeats": args.repeats, "bare_step_seconds": {p: float(np.median(v)) for p, v in bare_seconds.items()},
              "bare_step_seconds_trials": bare_seconds, "rows": rows, "trials": trials, "preparation": preparation}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
