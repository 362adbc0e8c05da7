"""Diagnostic: do synonym queries fail only at the background threshold? (docs/results.md, third session)

Scores the demo's evaluation split with the canonical and the synonym vocabulary and prints the synonym IoU under
three foreground rules: the canonical calibrated threshold (the protocol), a threshold that keeps the foreground
fraction found on the calibration split, and the canonical vocabulary's foreground named with the synonym one.

    python docs/diagnostics/synonym_foreground.py runs/exp_full/train/final rr
    python docs/diagnostics/synonym_foreground.py runs/exp_xm/train/final dense
"""
import sys

import numpy as np
import torch

from vilseg import evaluate as ev
from vilseg.segment import Segmenter


def report(tag, acc, held):
    iou = 100 * acc.iou()
    print(f"{tag}: mIoU {np.nanmean(iou):.1f}  class mean (no background) {np.nanmean(iou[1:]):.1f}  background {iou[0]:.1f}"
          f"  held-out combinations {np.nanmean(iou[held]):.1f}")


def main(model: str, readout: str, data: str = "data/demo") -> None:
    kwargs = dict(readout="cluster", refine=True, region="reencode") if readout == "rr" else dict(readout=readout)
    items, meta = ev.load_split(f"{data}/eval")
    calib, _ = ev.load_split(f"{data}/calib")
    names = meta["classes"][1:]
    n = len(names) + 1
    held = [meta["classes"].index(c) for c in meta["heldout_classes"]]
    seg = Segmenter.from_pretrained(model, queries=names, **kwargs)
    calib_canon = ev.class_scores(seg, calib)
    threshold, _ = ev.calibrate_threshold(calib_canon, n)
    fg_fraction = float(np.mean([(s.max(0).values > threshold).float().mean().item() for s, _ in calib_canon]))
    eval_canon = ev.class_scores(seg, items)
    seg.set_queries([meta["synonyms"][c] for c in names])
    calib_best = torch.cat([s.max(0).values.flatten() for s, _ in ev.class_scores(seg, calib)])
    syn_threshold = float(torch.quantile(calib_best[::7], 1 - fg_fraction))
    eval_syn = ev.class_scores(seg, items)
    print(f"{model} {readout}: threshold {threshold}, calibration foreground fraction {fg_fraction:.3f}, "
          f"synonym threshold at that fraction {syn_threshold:.3f}")
    report("canonical, protocol", ev.score_split(eval_canon, n, threshold), held)
    report("synonym, protocol threshold", ev.score_split(eval_syn, n, threshold), held)
    report("synonym, foreground-fraction threshold", ev.score_split(eval_syn, n, syn_threshold), held)
    acc = ev.IoUAccumulator(n)
    for (canon, label), (syn, _) in zip(eval_canon, eval_syn):
        acc.update(torch.where(canon.max(0).values > threshold, syn.argmax(0) + 1, 0).numpy(), label)
    report("synonym naming of the canonical foreground", acc, held)


if __name__ == "__main__":
    main(*sys.argv[1:])
