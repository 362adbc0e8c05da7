"""Diagnostic: how well does a model name colour and shape on the true foreground? (docs/results.md, sixth session)

For every ground-truth foreground pixel of the demo's evaluation split, takes the arg-max query (no background
threshold) with the canonical and the synonym vocabulary and prints the fraction whose class, colour and shape are
right. Chance is 1/16 for the class and 1/4 for colour or shape.

    python docs/diagnostics/naming_accuracy.py runs/ts_full/train/final dense
    python docs/diagnostics/naming_accuracy.py runs/ts_full/train/final rr    # refined clusters, re-encoded
    python docs/diagnostics/naming_accuracy.py runs/cd_full/train/final rg    # ... named by the global embedding
    python docs/diagnostics/naming_accuracy.py runs/cd_full/train/final g     # the paper's clusters, global (demo)
"""
import sys

import numpy as np
import torch

from vilseg import evaluate as ev
from vilseg.segment import Segmenter


def main(model: str, readout: str, data: str = "data/demo") -> None:
    regions = {"rr": "reencode", "rg": "reencode_global"}
    kwargs = (dict(readout="cluster", refine=True, region=regions[readout]) if readout in regions
              else dict(readout="cluster", refine=False, region="reencode_global") if readout == "g"
              else dict(readout=readout))
    items, meta = ev.load_split(f"{data}/eval")
    names = meta["classes"][1:]
    colour = [n.split()[0] for n in names]
    shape = [n.split()[1] for n in names]
    same_colour = torch.tensor([[a == b for b in colour] for a in colour])
    same_shape = torch.tensor([[a == b for b in shape] for a in shape])
    seg = Segmenter.from_pretrained(model, queries=names, **kwargs)
    for vocab in ("canonical", "synonym"):
        if vocab == "synonym":
            seg.set_queries([meta["synonyms"][c] for c in names])
        total = right = right_colour = right_shape = 0
        for scores, label in ev.class_scores(seg, items):
            label = torch.from_numpy(np.array(label, dtype=np.int64))
            fg = (label > 0) & (label != 255)
            truth, pred = label[fg] - 1, scores.argmax(0)[fg]
            total += truth.numel()
            right += (truth == pred).sum().item()
            right_colour += same_colour[truth, pred].sum().item()
            right_shape += same_shape[truth, pred].sum().item()
        print(f"{model} {readout} {vocab}: class {right / total:.3f}  colour {right_colour / total:.3f}  "
              f"shape {right_shape / total:.3f}  ({total} foreground pixels)")


if __name__ == "__main__":
    main(*sys.argv[1:])
