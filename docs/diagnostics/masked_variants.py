"""Which one-pass masked naming comes closest to re-encoding? Calibration-split mIoU (best threshold) of one model.

- ``copies`` (shipped: ``MaskedAttentionNaming``): each segment's prefix and patch tokens are copied at block depth-k
  and attend only to each other; the segment's embedding is the mean of its patch copies (an avg-pooled encoder).
- ``query-cls`` (MaskCLIP/SAN as written in the issue): one query per segment, initialised from the class token at
  block depth-k, attending to the image's own (context-full) patch tokens of its segment and to itself.
- ``query-mean``: the same query, initialised from the mean of its segment's patch tokens at block depth-k.
- ``pool`` and ``reencode_global``: the two existing namings, for reference.

    python docs/diagnostics/masked_variants.py /root/vilseg-runs/recipes/stages/dense-vilseg-demo/seed0/final
"""
import json
import sys
from pathlib import Path

import torch

from vilseg import eval as ev
from vilseg.inference import ReadOut, Segmenter
from vilseg.models import ViLSeg


class QueryNaming:
    def __init__(self, blocks, init):
        self.blocks, self.init = blocks, init

    def start(self, model):
        return 0 if self.blocks == "all" else model.image_encoder.depth - self.blocks

    def dense_kwargs(self, model):
        return {"keep_block": self.start(model)}

    def __call__(self, model, image, dense, ids):
        vit = model.image_encoder.vit
        hidden = dense["hidden"]  # [1, P + N, D]
        p, d = vit.num_prefix_tokens, hidden.shape[-1]
        n, s = hidden.shape[1] - p, int(ids.max()) + 1
        flat = ids.flatten()
        if self.init == "cls":
            query = hidden[:, :1].expand(1, s, d)
        else:
            sums = torch.zeros(s, d).index_add_(0, flat, hidden[0, p:])
            query = (sums / torch.bincount(flat, minlength=s)[:, None])[None]
        x = torch.cat([hidden, query], 1)
        total = p + n + s
        mask = torch.zeros(total, total, dtype=torch.bool)
        mask[: p + n, : p + n] = True  # the image's tokens: as usual
        mask[p + n:, p:p + n] = flat[None] == torch.arange(s)[:, None]  # a query: its segment's patches ...
        mask[p + n:, p + n:] = torch.eye(s, dtype=torch.bool)  # ... and itself
        for block in vit.blocks[self.start(model):]:
            x = block(x, attn_mask=mask[None, None])
        return model.embed_image(vit.norm(x)[0, p + n:])


def main(model_dir: str, data: str = "data/demo") -> dict:
    model = ViLSeg.from_pretrained(model_dir).eval()
    calib = ev.load_dataset("synthetic", Path(data) / "calib")
    protocol = ev.preset("A", "synthetic")
    results = {}
    variants = [("pool", None, None), ("reencode_global", None, None)]
    for k in (1, 2, "all"):
        variants += [("copies", k, None), ("query", k, "cls"), ("query", k, "mean")]
    for name, k, init in variants:
        naming = "masked_attention" if name in ("copies", "query") else name
        seg = Segmenter(model, readout=ReadOut("clusters", naming, None, **({"blocks": k} if k else {})))
        if name == "query":
            seg.naming = QueryNaming(k, init)
        scored = ev.class_score_maps(ev.SegmenterScores(seg), calib, protocol)
        threshold, sweep = ev.calibrate_threshold(scored, len(calib.classes))
        key = name + (f"-{init}" if init else "") + (f"@{k}" if k else "")
        results[key] = round(100 * sweep[threshold], 2)
        print(key, results[key], flush=True)
    return results


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:]), indent=1))
