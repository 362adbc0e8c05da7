"""Does the calibration split see what the evaluation split punishes? Seen mIoU with and without held-out objects.

The demo's calibration split is drawn from the training world, so it holds only seen colour-shape combinations. On
the evaluation split a held-out object that a read-out names as a *seen* class is a false positive of that class, and
lowers seen mIoU there, a cost the calibration split cannot show. For one model and each of the pooled and the
re-encoded read-out (the model's grouping as benchmarks/recipes.py reads it out, at the background threshold
the read-out's calibration chose), this prints:

- seen mIoU on the calibration split, and on the evaluation images without / with a held-out object;
- where the held-out objects' pixels go: their own class, another held-out class, a seen class, background.

    python docs/diagnostics/calibration_blind_spot.py MODEL_DIR [--data data/demo] [--out docs/results/calibration_blind_spot.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from vilseg import eval as ev
from vilseg.eval.calibrate import calibrate
from vilseg.eval.runner import class_score_maps, score_thresholds, threshold_predict
from vilseg.inference import Segmenter
from vilseg.models import ViLSeg

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from recipes import grouping_of  # noqa: E402  the grouping benchmarks/recipes.py reads this model out with


def seen_miou(scored, n: int, threshold: float, seen: list[int]) -> float:
    iou = score_thresholds(scored, n, threshold).iou()[seen]
    return float(100 * np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    model = ViLSeg.from_pretrained(args.model)
    calib = ev.load_dataset("synthetic", args.data / "calib")
    split = ev.load_dataset("synthetic", args.data / "eval")
    meta = json.loads((args.data / "eval" / "meta.json").read_text())
    classes, n = split.classes, len(split.classes)
    seen = [classes.index(c) for c in meta["seen_classes"]]
    heldout = [classes.index(c) for c in meta["heldout_classes"]]
    protocol = ev.preset("A", "synthetic")
    grouping = grouping_of(model, args.model)
    result = {"model": str(args.model), "grouping": grouping}
    for naming in ("pool", "reencode_global"):
        readout, _ = calibrate(model, calib, grouping, naming)  # this read-out alone: its own threshold
        predictor = ev.SegmenterScores(Segmenter(model, readout=readout))
        threshold = readout.threshold
        scored_calib = class_score_maps(predictor, calib, protocol)
        scored = class_score_maps(predictor, split, protocol)
        has_heldout = [bool(np.isin(label, heldout).any()) for _, label in scored]
        where = np.zeros(4, np.int64)  # own class, another held-out class, a seen class, background
        for (scores, label), flag in zip(scored, has_heldout):
            if not flag:
                continue
            pred = threshold_predict(scores, threshold)
            mask = np.isin(label, heldout)
            p, t = pred[mask], label[mask]
            where += [(p == t).sum(), (np.isin(p, heldout) & (p != t)).sum(), np.isin(p, seen).sum(), (p == 0).sum()]
        row = {"threshold": threshold, "calibration_miou": readout.calibration["miou"],
               "calibration_seen_miou": seen_miou(scored_calib, n, threshold, seen),
               "eval_seen_miou": seen_miou(scored, n, threshold, seen),
               "eval_seen_miou_without_heldout_objects": seen_miou(
                   [s for s, f in zip(scored, has_heldout) if not f], n, threshold, seen),
               "eval_seen_miou_with_heldout_objects": seen_miou([s for s, f in zip(scored, has_heldout) if f], n,
                                                                threshold, seen),
               "images_with_heldout_objects": int(sum(has_heldout)), "images": len(scored),
               "heldout_pixels_to": dict(zip(("own class", "other held-out class", "a seen class", "background"),
                                             (round(float(100 * w / max(where.sum(), 1)), 1) for w in where)))}
        result[f"{grouping}+{naming}"] = row
        print(json.dumps({"readout": f"{grouping}+{naming}", **row}), flush=True)
    if args.out:  # one entry per model: a file of several models keeps the others
        kept = json.loads(args.out.read_text()) if args.out.is_file() else {}
        args.out.write_text(json.dumps(kept | {str(args.model): result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
