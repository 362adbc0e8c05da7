"""Diagnostic: a model's evaluation scores at a background threshold forced by hand (outside the protocol).

    python docs/diagnostics/forced_threshold.py runs/exp_xm_s2/train/final 0.45     # dense read-out
"""
import sys

from vilseg import eval as ev
from vilseg.demo import group_miou
from vilseg.inference import ReadOut, Segmenter

model, threshold = sys.argv[1], float(sys.argv[2])
_, meta = ev.load_split("data/demo/eval")
seg = Segmenter.from_pretrained(model, readout=ReadOut("dense", "pool", threshold=None))
protocol = ev.apply_overrides(ev.preset("A", "synthetic"), [f"bg_threshold={threshold}"])
report = ev.evaluate(ev.SegmenterScores(seg), ev.load_dataset("synthetic", "data/demo/eval"), protocol)
iou = report["per_class"]
print(f"mIoU {report['miou']:.1f}  seen {group_miou(iou, meta['seen_classes']):.1f}  "
      f"held-out combinations {group_miou(iou, meta['heldout_classes']):.1f}  background {iou['background']:.1f}")
