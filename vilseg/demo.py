"""The demo: synthetic shards -> ViL-Seg training -> open-vocabulary segmentation of the held-out split.

    python -m vilseg.demo                       # full ViL-Seg, ~13 CPU-minutes of training
    python -m vilseg.demo --skip-train --naming pool   # the paper's read-out: clusters named by pooled patch embeddings
    python -m vilseg.demo --config configs/ablation/xm-demo.yaml --grouping merge --out runs/demo_xm
    python -m vilseg.demo --summarize runs/demo runs/demo_xm          # Markdown table of finished runs

Writes OUT/metrics.json (mIoU, per-class IoU; seen and held-out queries separately), OUT/overlays/*.png
(image | prediction | ground truth) and OUT/train/ (config, checkpoints, TensorBoard logs, final model).

Read-out: the demo calibrates every candidate read-out (``CANDIDATES``: the clustering head's segments named by
pooled patch embeddings, by masked attention in the encoder's last 1, 2 or all blocks, or by re-encoding; the ones
``--grouping``/``--naming``/``--blocks`` leave open) on the calibration split, keeps the fastest within 1 mIoU of the
best with its background threshold, saves it beside the model (``OUT/train/final/readout.json``, which
``Segmenter.from_pretrained`` and ``vilseg segment`` then use by default) and evaluates it. Which one wins for the
demo model is on the results page (docs/results.md).

Queries: the 16 colour-shape classes. "Seen" classes occur in training captions. Held-out queries are
(a) the 4 colour-shape combinations that never occur in training, and (b) every class worded with synonyms that
training never uses ("crimson disc" for "red circle"). The background threshold is calibrated on a split drawn from
the *training* world (seen classes only), never on the evaluation split.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import eval as ev
from .eval.calibrate import CANDIDATES, TOLERANCE, parse_readout, prefer_fastest, readout_key  # noqa: F401
from .inference.segmenter import ReadOut
from .inference.strategies import GROUPINGS, NAMINGS

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


def calibrate(model_dir: Path, data_dir: Path, grouping: str | None = None, naming: str | None = None,
              blocks=None, center: bool = True, **readout_options) -> tuple[ReadOut, dict]:
    """The read-out and background threshold of the model in ``model_dir``, chosen on the demo's calibration split
    (``data_dir/calib``, drawn from the training world) by :func:`vilseg.eval.calibrate.calibrate`, the code behind
    ``vilseg calibrate``."""
    from .eval.calibrate import calibrate as calibrate_readout
    from .models import ViLSeg

    model = ViLSeg.from_pretrained(model_dir)
    return calibrate_readout(model, ev.load_dataset("synthetic", data_dir / "calib"), grouping, naming, blocks,
                             center, **readout_options)


def evaluate_model(model_dir: Path, data_dir: Path, out: Path, n_overlays: int, grouping: str | None = None,
                   naming: str | None = None, save_readout: bool = False, blocks=None, center: bool = True,
                   **readout_options) -> dict:
    """Calibrates the read-out (:func:`calibrate`), optionally saves it beside the model, and evaluates it on the
    evaluation split with the canonical and the synonym vocabulary."""
    from .inference import Segmenter

    split = ev.load_dataset("synthetic", data_dir / "eval")
    meta = json.loads((data_dir / "eval" / "meta.json").read_text())
    names = split.classes[1:]
    readout, sweeps = calibrate(model_dir, data_dir, grouping, naming, blocks, center, **readout_options)
    if save_readout:
        readout.save(model_dir)
    seg = Segmenter.from_pretrained(model_dir, vocabulary=names, readout=readout, center=center)
    key = readout_key(readout.grouping, readout.naming, readout.blocks)
    report = {"readout": key, "bg_threshold": readout.threshold, "calibration_sweep": sweeps[key],
              "calibration": readout.calibration}
    protocol = ev.preset("A", "synthetic")
    per_query = {}
    for vocab in ("canonical", "synonym"):
        result = ev.evaluate(ev.SegmenterScores(seg), split, protocol, names="A" if vocab == "canonical" else vocab,
                             progress=False)
        iou = result["per_class"]
        report[vocab] = {"miou": result["miou"], "per_class_iou": iou,
                         "seen_miou": group_miou(iou, meta["seen_classes"]),
                         "heldout_combo_miou": group_miou(iou, meta["heldout_classes"]),
                         "background_iou": iou["background"], "protocol": result["protocol"]}
        for name in names:
            query = name if vocab == "canonical" else meta["synonyms"][name]
            per_query[query] = {"class": name, "iou": iou[name], "vocabulary": vocab,
                                "held_out": vocab == "synonym" or name in meta["heldout_classes"]}
        if vocab == "canonical":
            report["overlays"] = ev.write_overlays(seg, split, out / "overlays", n_overlays)
    held = [q["iou"] for q in per_query.values() if q["held_out"] and not np.isnan(q["iou"])]
    report.update(headline(report["canonical"]["seen_miou"], report["canonical"]["heldout_combo_miou"],
                           group_miou(report["synonym"]["per_class_iou"], names), float(np.mean(held)),
                           100 * text_ceiling(seg.model, names, meta["synonyms"])))
    report["per_query_iou"] = per_query
    return report


ABOUT = {
    "units": "every IoU, mIoU and share in this file is in percent",
    "seen_miou": "the 12 colour-shape classes that training captions name, canonical wording (README: 'seen')",
    "heldout_combo_miou": "the 4 colour-shape combinations training never shows, canonical wording: the image "
                          "side's composition",
    "synonym_miou": "the 16 classes worded with synonyms training never uses ('crimson disc'), background left out: "
                    "bounded by the text side (synonym_ceiling)",
    "synonym_ceiling": "share of the 16 synonym names whose nearest canonical name, under the model's own text side, "
                       "is their own class",
    "heldout_pooled_miou": "the 20 held-out queries pooled (4 combinations + 16 synonyms; README and docs/results.md: "
                           "'held-out')",
}


def headline(seen: float, combos: float, synonyms: float, pooled: float, ceiling: float) -> dict:
    """The numbers the README and the results page quote, under the names metrics.json gives them (``ABOUT``)."""
    return {"about": ABOUT, "seen_miou": seen, "heldout_combo_miou": combos, "synonym_miou": synonyms,
            "synonym_ceiling": ceiling, "heldout_pooled_miou": pooled}


def summary_line(report: dict) -> str:
    """The demo's last line: the README's two numbers first, then held-out in its two parts."""
    line = (f"demo: seen {report['seen_miou']:.1f} mIoU, held-out {report['heldout_pooled_miou']:.1f} (README's "
            f"numbers) = combinations {report['heldout_combo_miou']:.1f} + synonyms {report['synonym_miou']:.1f}")
    if report.get("synonym_ceiling") is not None:
        line += f" (text ceiling {report['synonym_ceiling']:.0f}%)"
    return line + f"; {report['canonical']['miou']:.1f} with background"


@torch.no_grad()
def text_ceiling(model, names: list[str], synonyms: dict[str, str]) -> float:
    """Fraction of synonym queries whose nearest canonical query (text side only) is the right class."""
    canon = model.encode_texts([f"a photo of a {n}." for n in names])
    syn = model.encode_texts([f"a photo of a {synonyms[n]}." for n in names])
    return float(((syn @ canon.t()).argmax(1) == torch.arange(len(names))).float().mean())


def chance_report(data_dir: Path) -> dict:
    meta = json.loads((data_dir / "eval" / "meta.json").read_text())
    acc = ev.chance_accumulator(ev.load_dataset("synthetic", data_dir / "eval"))
    iou = dict(zip(meta["classes"], (100 * acc.iou()).tolist()))
    # a labelling that ignores the names scores every wording alike: the synonym vocabulary as the canonical one
    classes = meta["classes"][1:]
    return {"readout": "chance", "canonical": {"miou": 100 * acc.miou(), "per_class_iou": iou,
                                               "seen_miou": group_miou(iou, meta["seen_classes"]),
                                               "heldout_combo_miou": group_miou(iou, meta["heldout_classes"])},
            **headline(group_miou(iou, meta["seen_classes"]), group_miou(iou, meta["heldout_classes"]),
                       group_miou(iou, classes), group_miou(iou, meta["heldout_classes"] + classes), None)}


def print_summary(report: dict) -> None:
    c = report["canonical"]
    print(f"\n== {report['readout']} read-out  (background threshold {report.get('bg_threshold', '-')})")
    print(f"mIoU (canonical names, background included): {c['miou']:.1f}")
    if "synonym" in report:
        print(f"synonym-worded vocabulary mIoU (background included): {report['synonym']['miou']:.1f}")
        print("per-class IoU (canonical / synonym):")
        for name, value in c["per_class_iou"].items():
            print(f"  {name:18s} {value:5.1f} / {report['synonym']['per_class_iou'][name]:5.1f}")


def summarize(run_dirs: list[Path]) -> str:
    """Markdown table of several demo runs (one row per OUT/metrics.json)."""
    rows = ["| run | config | read-out | mIoU (all, bg incl.) | seen | held-out (pooled) | held-out combinations | "
            "synonyms | synonym ceiling | background IoU | bg threshold |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in run_dirs:
        m = json.loads((Path(run) / "metrics.json").read_text())
        c = m["canonical"]
        fmt = lambda v: "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.1f}"  # noqa: E731
        rows.append(f"| {Path(run).name} | {m.get('config', '-')} | {m['readout']} | {fmt(c['miou'])} | "
                    f"{fmt(m['seen_miou'])} | {fmt(m['heldout_pooled_miou'])} | "
                    f"{fmt(m['heldout_combo_miou'])} | {fmt(m['synonym_miou'])} | {fmt(m.get('synonym_ceiling'))} | "
                    f"{fmt(c['per_class_iou'].get('background'))} | {m.get('bg_threshold', '-')} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    argv = list(argv) if argv is not None else None

    args_list = argv if argv is not None else sys.argv[1:]
    if args_list and args_list[0] == "--summarize":
        table = summarize([Path(p) for p in args_list[1:]])
        print(table)
        return {"table": table}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--chance", action="store_true", help="score a uniform random labelling instead of a model")
    parser.add_argument("--train-samples", type=int, default=30000)
    parser.add_argument("--eval-samples", type=int, default=300)
    parser.add_argument("--overlays", type=int, default=8)
    parser.add_argument("--grouping", choices=sorted(GROUPINGS), default=None,
                        help="fix the grouping (default: the calibration split chooses)")
    parser.add_argument("--naming", choices=sorted(NAMINGS), default=None,
                        help="fix the naming: pooled patch embeddings (the paper's), masked attention in the last k "
                             "blocks, or the re-encoded global embedding; default: the calibration split chooses")
    parser.add_argument("--blocks", default=None, type=lambda v: v if v == "all" else int(v),
                        help="with --naming masked_attention: fix k (an int or 'all'); default: calibrated")
    parser.add_argument("--skip-train", action="store_true", help="reuse OUT/train/final")
    parser.add_argument("--overwrite", action="store_true",
                        help="train anew into OUT/train although an earlier demo's run is there (default: refused)")
    parser.add_argument("overrides", nargs="*", help="key=value training-config overrides")
    args = parser.parse_args(argv)
    if not (args.skip_train or args.chance or args.overwrite):
        from .training.rundir import run_files

        held = run_files(args.out / "train")
        if held:  # before the data are prepared: the earlier run is not touched
            print(f"vilseg demo: {args.out / 'train'} already holds a trained run ({', '.join(held)}): "
                  f"--skip-train re-evaluates it, --overwrite trains anew, --out NEW_FOLDER trains elsewhere",
                  file=sys.stderr)
            raise SystemExit(2)
    if args.grouping == "dense":  # re-encoding names segments; a dense read-out's segments are single patches
        args.naming = "pool"
    start = time.time()
    pattern = prepare_data(args.data, args.train_samples, args.eval_samples, image_size=64)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.chance:
        report = chance_report(args.data)
    else:
        model_dir = args.out / "train" / "final"
        if not args.skip_train:
            from .train import main as train_main

            train_main(["--config", args.config, f"run.dir={args.out / 'train'}", f"data.shards={pattern}",
                        *args.overrides, *(["--overwrite"] if args.overwrite else [])])
        report = evaluate_model(model_dir, args.data, args.out, args.overlays, args.grouping, args.naming,
                                save_readout=True, blocks=args.blocks)
    report["config"] = args.config
    report["seconds_total"] = round(time.time() - start, 1)
    (args.out / "metrics.json").write_text(json.dumps(report, indent=1))
    print_summary(report)
    print(f"\nwrote {args.out / 'metrics.json'}" + (f" and {len(report.get('overlays', []))} overlays in "
                                                      f"{args.out / 'overlays'}" if report.get("overlays") else ""))
    print(summary_line(report))
    return report


if __name__ == "__main__":
    main()
