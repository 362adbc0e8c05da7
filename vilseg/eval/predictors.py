"""Dense predictors: window of pixels in, cosine score of every query name at every pixel out.

- :class:`SegmenterScores`: a vilseg model through its :class:`~vilseg.inference.Segmenter` read-out (the same
  grouping and naming strategies and the same vocabulary vectors as ``vilseg segment``), so that the evaluator, the
  demo and the Segmenter share one read-out path.
- :class:`OpenClipScores`: an off-the-shelf open_clip ViT with a MaskCLIP-style dense read-out (the last block's
  value path, without its query-key attention and MLP, then ``ln_post`` and the projection), the field's
  training-free baseline. Its weights are read from a local file only.
"""
from __future__ import annotations

from pathlib import Path

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
        return {"kind": "vilseg", "grouping": r.grouping, "naming": r.naming, "center": self.segmenter.center,
                "calibrated_threshold": r.threshold, "max_segments": r.max_segments, "min_area": r.min_area,
                **({"blocks": r.blocks} if r.naming == "masked_attention" else {})}

    def calibrated_threshold(self) -> float | None:
        return self.segmenter.readout.threshold

    def set_names(self, names: list[list[str]], templates) -> tuple[list[str], torch.Tensor]:
        """Embeds every name (template-averaged, centred as the Segmenter does)."""
        from ..inference import VocabularyIndex

        flat, owner = _flatten(names)
        vocabulary = {f"{i}:{n}": [n] for i, n in enumerate(flat)}
        index = VocabularyIndex.build(self.model, vocabulary, templates, center=self.segmenter.center, kind="flat")
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


class OpenClipScores:
    """An open_clip ViT with MaskCLIP's dense read-out.

    Args:
        name: an open_clip model name ("ViT-B-16").
        pretrained: a local weights file, or None for random weights (tests only: nothing is ever downloaded).
        device: torch device.
    """

    def __init__(self, name: str, pretrained: str | None = None, device=None):
        import open_clip

        if pretrained is not None and not Path(pretrained).is_file():
            raise FileNotFoundError(f"--pretrained {pretrained}: no such file (open_clip weights are read from a "
                                    "local file; nothing is downloaded)")
        if name not in open_clip.list_models():
            raise ValueError(f"--open-clip {name!r}: not an open_clip model name (see open_clip.list_models())")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = open_clip.create_model(name, pretrained=pretrained, device=self.device).eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.name, self.pretrained = name, pretrained
        visual = self.model.visual
        self.patch = visual.conv1.kernel_size[0]
        image_size = visual.image_size
        self.size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
        mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.default_templates = ("a photo of a {}.",)
        self.text = self.owner = None

    def describe(self) -> dict:
        return {"kind": "open_clip", "model": self.name, "pretrained": self.pretrained or "random weights",
                "readout": "MaskCLIP (value path of the last block)"}

    def calibrated_threshold(self) -> float | None:
        return None

    @torch.no_grad()
    def set_names(self, names: list[list[str]], templates) -> tuple[list[str], torch.Tensor]:
        flat, owner = _flatten(names)
        vectors = []
        for n in flat:
            tokens = self.tokenizer([t.format(n) for t in templates]).to(self.device)
            feats = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
            vectors.append(F.normalize(feats.mean(0), dim=-1))
        self.text, self.owner = torch.stack(vectors), owner
        return flat, owner

    def _positional(self, h: int, w: int) -> torch.Tensor:
        pos = self.model.visual.positional_embedding  # [1 + N, D]
        n = pos.shape[0] - 1
        side = int(round(n ** 0.5))
        if (h, w) == (side, side):
            return pos
        grid = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(h * w, -1)])

    @torch.no_grad()
    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        """[B, 3, h, w] RGB in [0, 1] -> [B, T, h, w] cosine of each name at each pixel."""
        visual = self.model.visual
        b, _, h, w = windows.shape
        p = self.patch
        size = (max(p, round(h / p) * p), max(p, round(w / p) * p))
        x = windows.to(self.device)
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        x = visual.conv1(x)  # [B, D, gh, gw]
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(b, -1, -1)
        x = torch.cat([cls, x], 1) + self._positional(gh, gw).to(x.dtype)
        x = visual.ln_pre(x)
        transformer = visual.transformer
        blocks = list(transformer.resblocks)
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        for block in blocks[:-1]:
            x = block(x)
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        last = blocks[-1]
        attn = last.attn
        dim = x.shape[-1]
        v = F.linear(last.ln_1(x), attn.in_proj_weight[2 * dim:], attn.in_proj_bias[2 * dim:])
        v = attn.out_proj(v)  # MaskCLIP: the value path only, no residual, no MLP
        feats = visual.ln_post(v[:, 1:])
        if visual.proj is not None:
            feats = feats @ visual.proj
        feats = F.normalize(feats.float(), dim=-1)  # [B, N, E]
        scores = (feats @ self.text.t()).transpose(1, 2).reshape(b, -1, gh, gw)
        return F.interpolate(scores, size=(h, w), mode="bilinear", align_corners=False)
