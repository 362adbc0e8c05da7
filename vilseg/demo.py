"""The demo: synthetic shards -> ViL-Seg training -> open-vocabulary segmentation of the held-out split.

    python -m vilseg.demo                       # full ViL-Seg, ~13 CPU-minutes of training
    python -m vilseg.demo --skip-train --region pool   # the paper's read-out: clusters named by pooled patch embeddings
    python -m vilseg.demo --config configs/demo_xm_only.yaml --readout dense --out runs/demo_xm_only
    python -m vilseg.demo --summarize runs/demo runs/demo_xm_only     # Markdown table of finished runs

Writes OUT/metrics.json (mIoU, per-class IoU; seen and held-out queries separately), OUT/overlays/*.png
(image | prediction | ground truth) and OUT/train/ (config, checkpoints, TensorBoard logs, final model).

Read-out: by default the paper's clusters (connected components of the clustering head's arg-max), each segment
named by the *global* embedding of its own re-encoding (``Segmenter(region="reencode_global")``), the read-out that
scores best on the calibration split (docs/results.md); ``--region pool`` is the paper's naming by pooled patch
embeddings.

Queries: the 16 colour-shape classes. "Seen" classes occur in training captions. Held-out queries are
(a) the 4 colour-shape combinations that never occur in training, and (b) every class worded with synonyms that
training never uses ("crimson disc" for "red circle"). The background threshold is calibrated on a split drawn from
the *training* world (seen classes only), never on the evaluation split.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from . import evaluate as ev
from .segment import REGIONS


def prepare_data(data_dir: Path, n_train: int, n_eval: int, image_size: int) -> str:
    from data_prep import synthetic

    from .data.synthetic import SyntheticWorld

    manifest = data_dir / "manifest.json"
    wanted = {"train_samples": n_train, "eval_samples": n_eval,
              "world": SyntheticWorld("train", image_size=image_size).describe()}
    if manifest.is_file():
        existing = json.loads(manifest.read_text())
        if all(existing.get(k) == v for k, v in wanted.items()):
            return existing["pattern"]
    synthetic.main(["--out", str(data_dir), "--train", str(n_train), "--eval", str(n_eval),
                    "--image-size", str(image_size)])
    return json.loads(manifest.read_text())["pattern"]


def group_miou(iou: dict[str, float], names: list[str]) -> float:
    values = [iou[n] for n in names if not np.isnan(iou[n])]
    return float(np.mean(values)) if values else float("nan")


def evaluate_model(model_dir: Path, data_dir: Path, out: Path, readout: str, n_overlays: int,
                   region: str = "pool") -> dict:
    from .segment import Segmenter

    items, meta = ev.load_split(data_dir / "eval")
    calib, _ = ev.load_split(data_dir / "calib")
    names = meta["classes"][1:]
    n_classes = len(names) + 1
    seg = Segmenter.from_pretrained(model_dir, queries=names, readout=readout, region=region)
    threshold, sweep = ev.calibrate_threshold(ev.class_scores(seg, calib), n_classes)
    seg.bg_threshold = threshold
    name = readout + ("" if region == "pool" else "+" + region)
    report = {"readout": name, "bg_threshold": threshold,
              "calibration_sweep": sweep}
    per_query = {}
    for vocab in ("canonical", "synonym"):
        queries = names if vocab == "canonical" else [meta["synonyms"][n] for n in names]
        seg.set_queries(queries)
        acc = ev.score_split(ev.class_scores(seg, items), n_classes, threshold)
        iou = dict(zip(meta["classes"], (100 * acc.iou()).tolist()))
        report[vocab] = {"miou": 100 * acc.miou(), "per_class_iou": iou,
                         "seen_miou": group_miou(iou, meta["seen_classes"]),
                         "heldout_combo_miou": group_miou(iou, meta["heldout_classes"]),
                         "background_iou": iou["background"]}
        for name in names:
            query = name if vocab == "canonical" else meta["synonyms"][name]
            per_query[query] = {"class": name, "iou": iou[name], "vocabulary": vocab,
                                "held_out": vocab == "synonym" or name in meta["heldout_classes"]}
        if vocab == "canonical":
            seg_names = ["background", *queries]
            report["overlays"] = ev.write_overlays(seg, items, seg_names, out / "overlays", n_overlays)
    seen = [q["iou"] for q in per_query.values() if not q["held_out"] and not np.isnan(q["iou"])]
    held = [q["iou"] for q in per_query.values() if q["held_out"] and not np.isnan(q["iou"])]
    report["seen_queries_miou"] = float(np.mean(seen))
    report["heldout_queries_miou"] = float(np.mean(held))
    report["per_query_iou"] = per_query
    report["text_ceiling_synonym_top1"] = text_ceiling(seg.model, names, meta["synonyms"])
    return report


@torch.no_grad()
def text_ceiling(model, names: list[str], synonyms: dict[str, str]) -> float:
    """Fraction of synonym queries whose nearest canonical query (text side only) is the right class."""
    canon = model.encode_texts([f"a photo of a {n}." for n in names])
    syn = model.encode_texts([f"a photo of a {synonyms[n]}." for n in names])
    return float(((syn @ canon.t()).argmax(1) == torch.arange(len(names))).float().mean())


def chance_report(data_dir: Path) -> dict:
    items, meta = ev.load_split(data_dir / "eval")
    acc = ev.chance_accumulator(items, len(meta["classes"]))
    iou = dict(zip(meta["classes"], (100 * acc.iou()).tolist()))
    return {"readout": "chance", "canonical": {"miou": 100 * acc.miou(), "per_class_iou": iou,
                                               "seen_miou": group_miou(iou, meta["seen_classes"]),
                                               "heldout_combo_miou": group_miou(iou, meta["heldout_classes"])},
            "seen_queries_miou": group_miou(iou, meta["seen_classes"]),
            "heldout_queries_miou": group_miou(iou, meta["classes"][1:])}


def print_summary(report: dict) -> None:
    c = report["canonical"]
    print(f"\n== {report['readout']} read-out  (background threshold {report.get('bg_threshold', '-')})")
    print(f"mIoU (canonical names, background included): {c['miou']:.1f}")
    print(f"seen queries mIoU: {report['seen_queries_miou']:.1f}   held-out queries mIoU: "
          f"{report['heldout_queries_miou']:.1f}")
    if "synonym" in report:
        print(f"synonym-worded vocabulary mIoU: {report['synonym']['miou']:.1f}   "
              f"held-out combinations (canonical) mIoU: {c['heldout_combo_miou']:.1f}")
        print("per-class IoU (canonical / synonym):")
        for name, value in c["per_class_iou"].items():
            print(f"  {name:18s} {value:5.1f} / {report['synonym']['per_class_iou'][name]:5.1f}")


def summarize(run_dirs: list[Path]) -> str:
    """Markdown table of several demo runs (one row per OUT/metrics.json)."""
    rows = ["| run | config | read-out | mIoU (all, bg incl.) | seen queries | held-out queries | held-out combos "
            "(canonical) | synonym vocabulary | background IoU | bg threshold |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for run in run_dirs:
        m = json.loads((Path(run) / "metrics.json").read_text())
        c, syn = m["canonical"], m.get("synonym", {})
        fmt = lambda v: "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.1f}"  # noqa: E731
        rows.append(f"| {Path(run).name} | {m.get('config', '-')} | {m['readout']} | {fmt(c['miou'])} | "
                    f"{fmt(m['seen_queries_miou'])} | {fmt(m['heldout_queries_miou'])} | "
                    f"{fmt(c.get('heldout_combo_miou'))} | {fmt(syn.get('miou'))} | "
                    f"{fmt(c['per_class_iou'].get('background'))} | {m.get('bg_threshold', '-')} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    argv = list(argv) if argv is not None else None
    import sys

    args_list = argv if argv is not None else sys.argv[1:]
    if args_list and args_list[0] == "--summarize":
        table = summarize([Path(p) for p in args_list[1:]])
        print(table)
        return {"table": table}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--readout", choices=("cluster", "dense", "chance"), default="cluster")
    parser.add_argument("--train-samples", type=int, default=30000)
    parser.add_argument("--eval-samples", type=int, default=300)
    parser.add_argument("--overlays", type=int, default=8)
    parser.add_argument("--region", choices=REGIONS, default="reencode_global",
                        help="cluster read-out: segment embedding by re-encoding the segment alone and taking its "
                             "global embedding (default) or pooling its patch embeddings, or by pooling the patch "
                             "embeddings of the whole image (the paper)")
    parser.add_argument("--skip-train", action="store_true", help="reuse OUT/train/final")
    parser.add_argument("overrides", nargs="*", help="key=value training-config overrides")
    args = parser.parse_args(argv)
    if args.readout != "cluster":  # re-encoding acts on clusters; other read-outs have none
        args.region = "pool"
    start = time.time()
    pattern = prepare_data(args.data, args.train_samples, args.eval_samples, image_size=64)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.readout == "chance":
        report = chance_report(args.data)
    else:
        model_dir = args.out / "train" / "final"
        if not args.skip_train:
            from .train import main as train_main

            train_main(["--config", args.config, f"run.dir={args.out / 'train'}", f"data.shards={pattern}",
                        *args.overrides])
        report = evaluate_model(model_dir, args.data, args.out, args.readout, args.overlays, args.region)
    report["config"] = args.config
    report["seconds_total"] = round(time.time() - start, 1)
    (args.out / "metrics.json").write_text(json.dumps(report, indent=1))
    print_summary(report)
    print(f"\nwrote {args.out / 'metrics.json'}" + (f" and {len(report.get('overlays', []))} overlays in "
                                                      f"{args.out / 'overlays'}" if report.get("overlays") else ""))
    return report


if __name__ == "__main__":
    main()
