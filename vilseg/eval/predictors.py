"""Dense predictors: window of pixels in, cosine score of every query name at every pixel out.

:class:`SegmenterScores`: a vilseg model through its :class:`~vilseg.inference.Segmenter` read-out (the same
grouping and naming strategies and the same vocabulary vectors as ``vilseg segment``), so that the evaluator, the
demo and the Segmenter share one read-out path. An off-the-shelf CLIP goes the same way
(:meth:`~vilseg.inference.Segmenter.from_open_clip`, with the training-free read-outs MaskCLIP, SCLIP and NACLIP as
naming strategies).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F


def _flatten(names: list[list[str]]) -> tuple[list[str], torch.Tensor]:
    """Per-class name lists -> (every name, [T] owning class index)."""
    flat = [n for group in names for n in group]
    owner = torch.tensor([c for c, group in enumerate(names) for _ in group], dtype=torch.long)
    if not flat:
        raise ValueError("no class has a name to query")
    return flat, owner


class SegmenterScores:
    """A vilseg model's read-out (``segmenter.grouping`` + ``segmenter.naming``) as a dense name-score predictor."""

    def __init__(self, segmenter):
        self.segmenter = segmenter
        self.model = segmenter.model
        self.size = self.model.config.image.img_size
        self.patch = segmenter.patch
        self.default_templates = tuple(segmenter.templates)
        self.vectors = self.owner = None

    def describe(self) -> dict:
        r = self.segmenter.readout
        kind = "clip" if getattr(self.model, "joint", "learned") == "clip" else "vilseg"
        return {"kind": kind, "grouping": r.grouping, "naming": r.naming, "center": self.segmenter.center,
                "reference": self.segmenter.reference if self.segmenter.center else None,
                "calibrated_threshold": r.threshold, "max_segments": r.max_segments, "min_area": r.min_area,
                **({"blocks": r.blocks} if r.naming == "masked_attention" else {})}

    def calibrated_threshold(self) -> float | None:
        return self.segmenter.readout.threshold

    def set_names(self, names: list[list[str]], templates) -> tuple[list[str], torch.Tensor]:
        """Embeds every name (template-averaged, centred as the Segmenter does)."""
        from ..inference import VocabularyIndex

        flat, owner = _flatten(names)
        vocabulary = {f"{i}:{n}": [n] for i, n in enumerate(flat)}
        index = VocabularyIndex.build(self.model, vocabulary, templates, center=self.segmenter.center, kind="flat",
                                     reference=self.segmenter.reference)
        self.vectors = torch.from_numpy(index.vectors).to(self.segmenter.device)  # [T, E]
        self.owner = owner
        return flat, owner

    @torch.no_grad()
    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        """[B, 3, h, w] RGB in [0, 1] -> [B, T, h, w] cosine of each name at each pixel."""
        b, _, h, w = windows.shape
        p = self.patch
        size = (max(p, round(h / p) * p), max(p, round(w / p) * p))
        x = windows.to(self.segmenter.device)
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        x = self.model.image_encoder.normalize(x)
        out = []
        for _, ids, emb in self.segmenter.read_batch(x):  # the Segmenter's forward, bounded grouping and naming
            sims = emb.float() @ self.vectors.t()  # [S, T]
            out.append(sims[ids].permute(2, 0, 1))  # [T, h/p, w/p]
        scores = torch.stack(out)
        return F.interpolate(scores, size=(h, w), mode="bilinear", align_corners=False)
