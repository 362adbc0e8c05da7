"""Diagnostic: given the *true* object masks, which way of embedding a segment names its shape? (seventh session)

For every object of the evaluation split (its ground-truth mask, downsampled to the patch grid by majority), names
the object by the best of the 16 canonical queries (templates averaged, centred, as the Segmenter does) with four
segment embeddings and prints class / colour / shape accuracy for each (chance 1/16, 1/4, 1/4):

  pool-norm   mean of the L2-normalised joint-space patch embeddings over the mask (the paper's masked pooling)
  pool-raw    mean of the *unnormalised* projected patch tokens over the mask (what the global embedding averages)
  re-patch    the image re-encoded with everything outside the mask blanked; mean of its normalised patch embeddings
              over the mask (a read-out the seventh session removed: it named shape at chance)
  re-global   the same re-encoding's global image embedding

    python docs/diagnostics/oracle_segments.py runs/ts_full/train/final
"""
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vilseg import eval as ev
from vilseg.inference import ReadOut, Segmenter


@torch.no_grad()
def main(model: str, data: str = "data/demo", limit: int = 300) -> None:
    items, meta = ev.load_split(f"{data}/eval")
    names = meta["classes"][1:]
    seg = Segmenter.from_pretrained(model, vocabulary=names, readout=ReadOut("dense", "pool", threshold=None))
    m = seg.model
    ways = ("pool-norm", "pool-raw", "re-patch", "re-global")
    hits = {w: np.zeros(3) for w in ways}
    total = 0
    for _, image_path, mask_path in items[:int(limit)]:
        x, _ = seg.preprocess(image_path)
        feats = m.image_encoder(x)
        h, w = feats.grid
        raw = m.image_proj(feats.patch_tokens)[0]  # [N, E]
        norm = F.normalize(raw, dim=-1)
        gt = torch.from_numpy(np.asarray(Image.open(mask_path).resize((w, h), Image.NEAREST)).astype(np.int64))
        for c in [int(c) for c in torch.unique(gt) if 0 < c < 255]:
            mask = (gt == c).flatten().float()
            if mask.sum() == 0:
                continue
            pix = mask.view(1, 1, h, w).repeat_interleave(seg.patch, 2).repeat_interleave(seg.patch, 3)
            out = m.dense_embeddings(x * pix)
            re_patch = out["patch_embed"][0].flatten(1).T  # [N, E]
            embeds = {
                "pool-norm": mask @ norm, "pool-raw": mask @ raw,
                "re-patch": mask @ re_patch, "re-global": out["image_embed"][0],
            }
            truth = names[c - 1]
            total += 1
            for way, e in embeds.items():
                pred = names[int(seg.index.scores(F.normalize(e, dim=-1)[None])[0].argmax())]
                hits[way] += [pred == truth, pred.split()[0] == truth.split()[0], pred.split()[1] == truth.split()[1]]
    print(f"{model}: {total} objects (true masks); accuracy class / colour / shape")
    for way in ways:
        a = 100 * hits[way] / total
        print(f"  {way:10s} {a[0]:5.1f} / {a[1]:5.1f} / {a[2]:5.1f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
