"""Diagnostic: does the *global* image embedding name the shape? (docs/results.md, sixth session)

For every evaluation image that holds exactly one object, scores the global image embedding against the 16
canonical queries (templates averaged, centred, as the Segmenter does) and prints how often the class, the colour and
the shape of the best query are right. Chance: 1/16 for the class, 1/4 for colour or shape. If this is at chance
too, the captions did not teach shape at image level; if it is well above, the shape is learnt but does not reach
the patch embeddings.

    python docs/diagnostics/global_shape.py runs/ts_full/train/final
"""
import sys

import numpy as np
import torch
from PIL import Image

from vilseg import eval as ev
from vilseg.inference import ReadOut, Segmenter


@torch.no_grad()
def main(model: str, data: str = "data/demo") -> None:
    items, meta = ev.load_split(f"{data}/eval")
    names = meta["classes"][1:]
    seg = Segmenter.from_pretrained(model, vocabulary=names, readout=ReadOut("dense", "pool", threshold=None))
    total = right = right_colour = right_shape = 0
    for _, image_path, mask_path in items:
        present = [c for c in np.unique(np.asarray(Image.open(mask_path))) if 0 < c < 255]
        if len(present) != 1:
            continue
        x, _ = seg.preprocess(image_path)
        embed = seg.model.dense_embeddings(x)["image_embed"]  # [1, E]
        pred = names[int(seg.index.scores(embed)[0].argmax())]
        truth = names[int(present[0]) - 1]
        total += 1
        right += pred == truth
        right_colour += pred.split()[0] == truth.split()[0]
        right_shape += pred.split()[1] == truth.split()[1]
    print(f"{model}: {total} one-object images; global embedding names class {right / total:.3f}  "
          f"colour {right_colour / total:.3f}  shape {right_shape / total:.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
