"""Which centring reference suits which naming? Every naming of the calibration's candidates under both references.

For one model, each read-out (pooled, masked attention at k, re-encoded) is scored with names centred on the
training captions' mean ("captions") and on the prompt templates' own embedding ("prompt",
vilseg.inference.vocabulary.PROMPT_WORD): threshold calibrated on the demo's calibration split, then seen and
held-out-combination mIoU on its evaluation split, as the demo measures them (protocol A).

    python docs/diagnostics/readout_reference.py MODEL_DIR --seed N [--data data/demo] [--out docs/results/readout_references.csv]

Prints one JSON object per (read-out, reference) and appends it as a row to --out (CSV).
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from vilseg import eval as ev
from vilseg.eval.calibrate import CANDIDATES, readout_key
from vilseg.eval.runner import calibrate_threshold, class_score_maps, score_thresholds
from vilseg.inference import ReadOut, Segmenter
from vilseg.inference.vocabulary import REFERENCES
from vilseg.models import ViLSeg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--seed", type=int, required=True, help="the model's seed, for the row")
    parser.add_argument("--recipe", default="scratch", help="the model's recipe, for the row")
    parser.add_argument("--out", type=Path, default=Path("docs/results/readout_references.csv"))
    args = parser.parse_args()

    model = ViLSeg.from_pretrained(args.model)
    calib = ev.load_dataset("synthetic", args.data / "calib")
    split = ev.load_dataset("synthetic", args.data / "eval")
    meta = json.loads((args.data / "eval" / "meta.json").read_text())
    protocol = ev.preset("A", "synthetic")
    rows = []
    for grouping, naming, blocks in CANDIDATES:
        for reference in REFERENCES:
            readout = ReadOut(grouping, naming, threshold=None, reference=reference,
                              **({"blocks": blocks} if blocks is not None else {}))
            predictor = ev.SegmenterScores(Segmenter(model, readout=readout, center=True))
            threshold, sweep = calibrate_threshold(class_score_maps(predictor, calib, protocol), len(calib.classes))
            result = score_thresholds(class_score_maps(predictor, split, protocol), len(split.classes), threshold)
            iou = dict(zip(split.classes, 100 * result.iou()))
            row = {"recipe": args.recipe, "seed": args.seed, "readout": readout_key(grouping, naming, blocks), "reference": reference,
                   "threshold": threshold, "calibration_miou": round(100 * sweep[threshold], 2),
                   "seen_miou": round(float(np.nanmean([iou[c] for c in meta["seen_classes"]])), 2),
                   "heldout_combo_miou": round(float(np.nanmean([iou[c] for c in meta["heldout_classes"]])), 2),
                   "background_iou": round(float(iou["background"]), 2)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    new = not args.out.is_file()
    with args.out.open("a", newline="") as f:  # written once all are measured: no half run in the file
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
