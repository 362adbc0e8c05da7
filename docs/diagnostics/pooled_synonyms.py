"""Is the pooled read-out's synonym score limited by the background threshold?

    python docs/diagnostics/pooled_synonyms.py MODEL_DIR      # data/demo as the demo or the recipes write it

Prints the seen-class mIoU and background IoU on the evaluation split under the canonical names and under the
synonyms, for pooled and re-encoded naming, with no threshold and at three fixed thresholds.
"""
import json
import sys
from pathlib import Path

from vilseg import eval as ev
from vilseg.demo import group_miou
from vilseg.inference import ReadOut, Segmenter

model, data = Path(sys.argv[1]), Path("data/demo")
split = ev.load_dataset("synthetic", data / "eval")
meta = json.loads((data / "eval" / "meta.json").read_text())
names = split.classes[1:]
protocol = ev.preset("A", "synthetic")
for naming in ("pool", "reencode_global"):
    for threshold in (None, 0.3, 0.45, 0.55):
        seg = Segmenter.from_pretrained(model, vocabulary=names, readout=ReadOut("clusters", naming, threshold=threshold))
        row = {}
        for vocab in ("A", "synonym"):
            r = ev.evaluate(ev.SegmenterScores(seg), split, protocol, names=vocab, progress=False)
            row["canonical" if vocab == "A" else vocab] = (round(group_miou(r["per_class"], meta["seen_classes"]), 1),
                                                           round(r["per_class"]["background"], 1))
        print(naming, threshold, "seen mIoU / background IoU:", row, flush=True)
