"""Diagnostic: a model's evaluation scores at a background threshold forced by hand (outside the protocol).

    python docs/diagnostics/forced_threshold.py runs/exp_xm_s2/train/final 0.45     # dense read-out
"""
import sys

from vilseg import evaluate as ev
from vilseg.demo import group_miou
from vilseg.inference import ReadOut, Segmenter

model, threshold = sys.argv[1], float(sys.argv[2])
items, meta = ev.load_split("data/demo/eval")
seg = Segmenter.from_pretrained(model, vocabulary=meta["classes"][1:],
                                readout=ReadOut("dense", "pool", threshold=None))
acc = ev.score_split(ev.class_scores(seg, items), len(meta["classes"]), threshold)
iou = dict(zip(meta["classes"], (100 * acc.iou()).tolist()))
print(f"mIoU {100 * acc.miou():.1f}  seen {group_miou(iou, meta['seen_classes']):.1f}  "
      f"held-out combinations {group_miou(iou, meta['heldout_classes']):.1f}  background {iou['background']:.1f}")
