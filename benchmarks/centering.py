"""Scores centred on the model's fixed text reference against scores centred on the query list, on the same demo
models: calibration mIoU (and the evaluation split's) per seed, rows in docs/results/centering.csv.

Training does not use the centring, so one trained model serves both. The list-centred numbers are the demo's own,
run at the commit before the reference existed (3c1cf96, where ``VocabularyIndex.build`` subtracted the mean of the
names asked); this script reads them from each run's metrics.json. For the reference-centred numbers it copies the
run's exported model, fits the text reference exactly as ``train.export`` now does (the training config's
``data.shards``, its first ``train.text_subspace_captions`` captions, under the exported text side) and runs the
demo's calibration and evaluation on the copy (``vilseg.demo.evaluate_model``, the code behind
``python -m vilseg.demo --skip-train``).

    git worktree add /tmp/old 3c1cf96 && cd /tmp/old && ln -s /work/main/data data
    python -m vilseg.demo --out runs/centering/seed0 --overlays 0 run.seed=0        # and seeds 1, 2
    cd /work/main && python benchmarks/centering.py /tmp/old/runs/centering/seed{0,1,2}
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["seed", "scores", "readout", "threshold", "calib_miou", "calib_best_other", "miou_seen",
           "miou_heldout_combo", "miou_synonym", "miou_heldout_pooled", "miou_all", "machine"]


def row(seed: int, scores: str, m: dict, synonym_miou: float, pooled: float) -> dict:
    cal = m["calibration"]
    others = [v for k, v in cal["candidates"].items() if k != m["readout"]]
    return {"seed": seed, "scores": scores, "readout": m["readout"], "threshold": m["bg_threshold"],
            "calib_miou": round(cal["miou"], 2), "calib_best_other": round(max(others), 2) if others else "",
            "miou_seen": round(m["canonical"]["seen_miou"], 2),
            "miou_heldout_combo": round(m["canonical"]["heldout_combo_miou"], 2),
            "miou_synonym": round(synonym_miou, 2), "miou_heldout_pooled": round(pooled, 2),
            "miou_all": round(m["canonical"]["miou"], 2),
            "machine": f"{platform.machine()} CPU, 2 cores, single-thread runs side by side"}


def main(argv=None) -> None:
    from vilseg import demo
    from vilseg.data.stream import read_captions
    from vilseg.models import ViLSeg

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="demo --out folders trained and evaluated at 3c1cf96")
    p.add_argument("--data", type=Path, default=REPO / "data/demo")
    p.add_argument("--work", type=Path, default=REPO / "runs/centering-reference")
    p.add_argument("--csv", type=Path, default=REPO / "docs/results/centering.csv")
    args = p.parse_args(argv)
    meta = json.loads((args.data / "eval" / "meta.json").read_text())
    names = meta["classes"][1:]
    rows = []
    for run in args.runs:
        cfg = yaml.safe_load((run / "train" / "config.yaml").read_text())
        seed = int(cfg["run"]["seed"])
        old = json.loads((run / "metrics.json").read_text())
        if "seen_queries_miou" not in old:
            raise SystemExit(f"{run / 'metrics.json'} is not a list-centred run of 3c1cf96 (no seen_queries_miou)")
        rows.append(row(seed, "list-centred", old, demo.group_miou(old["synonym"]["per_class_iou"], names),
                        old["heldout_queries_miou"]))
        out = args.work / f"seed{seed}"
        model_dir = out / "train" / "final"
        if model_dir.exists():
            shutil.rmtree(model_dir)
        shutil.copytree(run / "train" / "final", model_dir, ignore=shutil.ignore_patterns("readout.json"))
        shutil.copy(run / "train" / "config.yaml", out / "train" / "config.yaml")
        model = ViLSeg.from_pretrained(model_dir)
        model.fit_text_reference(read_captions(cfg["data"]["shards"], cfg["train"]["text_subspace_captions"]))
        model.save_pretrained(model_dir)
        new = demo.evaluate_model(model_dir, args.data, out, 0, save_readout=True)
        (out / "metrics.json").write_text(json.dumps(new, indent=1))
        rows.append(row(seed, "reference", new, new["synonym_miou"], new["heldout_pooled_miou"]))
        print(json.dumps(rows[-2:]), flush=True)
    known = {}
    if args.csv.is_file():
        with args.csv.open() as f:
            known = {(r["seed"], r["scores"]): r for r in csv.DictReader(f)}
    for r in rows:
        known[(str(r["seed"]), r["scores"])] = r
    with args.csv.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for key in sorted(known, key=lambda k: (k[1], int(k[0]))):
            w.writerow(known[key])
    for scores in ("list-centred", "reference"):
        got = [r for r in known.values() if r["scores"] == scores]
        for col in ("calib_miou", "miou_seen", "miou_heldout_combo", "miou_synonym"):
            v = np.array([float(r[col]) for r in got])
            print(f"{scores:13s} {col:20s} {v.mean():6.2f} +- {v.std():5.2f} (n={len(v)})")


if __name__ == "__main__":
    main()
