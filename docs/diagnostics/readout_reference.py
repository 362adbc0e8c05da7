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
import tempfile
from pathlib import Path

from vilseg import demo
from vilseg.eval.calibrate import CANDIDATES, readout_key
from vilseg.inference.vocabulary import REFERENCES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--seed", type=int, required=True, help="the model's seed, for the row")
    parser.add_argument("--recipe", default="scratch", help="the model's recipe, for the row")
    parser.add_argument("--out", type=Path, default=Path("docs/results/readout_references.csv"))
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for grouping, naming, blocks in CANDIDATES:
            for reference in REFERENCES:  # the demo's calibration and evaluation, the reference given
                report = demo.evaluate_model(args.model, args.data, Path(scratch), 0, grouping, naming, blocks=blocks,
                                             reference=reference)
                row = {"recipe": args.recipe, "seed": args.seed, "readout": readout_key(grouping, naming, blocks),
                       "reference": reference, "threshold": report["bg_threshold"],
                       "calibration_miou": round(report["calibration"]["miou"], 2),
                       "seen_miou": round(report["seen_miou"], 2),
                       "heldout_combo_miou": round(report["heldout_combo_miou"], 2),
                       "background_iou": round(report["canonical"]["background_iou"], 2)}
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
