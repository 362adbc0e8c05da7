"""Combines the ViL-Seg losses with config weights; the training loop sums and logs every term."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .losses import CrossModalInfoNCE, IICLoss, VisionContrast, align_to_box, overlap_boxes


class ViLSegObjective(nn.Module):
    """L = w_xm * L_xm + w_vis * L_vis + w_clu * L_clu, computing only the terms with a non-zero weight.

    Args:
        weights: mapping of term name ("xm", "vis", "clu") to weight; unknown names are an error.
        vis_temperature: tau_v of the vision contrast.
        iic_lambda: IIC's entropy weight lambda.
        align_size: side of the RoIAligned overlap grid the IIC pairs are sampled on.
        clu_detach: the clustering term trains the clustering head only (its input patch tokens are detached),
            so it cannot reshape the encoder.
    """

    TERMS = ("xm", "vis", "clu")

    def __init__(self, weights: dict[str, float], vis_temperature: float = 0.1, iic_lambda: float = 1.0,
                 align_size: int = 8, clu_detach: bool = False):
        super().__init__()
        self.clu_detach = bool(clu_detach)
        unknown = sorted(set(weights) - set(self.TERMS))
        if unknown:
            raise KeyError(f"loss.weights has unknown term(s) {unknown}; known terms: {list(self.TERMS)}")
        self.weights = {k: float(v) for k, v in weights.items() if float(v) != 0.0}
        if not self.weights:
            raise ValueError("loss.weights: every weight is zero, nothing to train")
        self.xm = CrossModalInfoNCE()
        self.vis = VisionContrast(vis_temperature)
        self.clu = IICLoss(iic_lambda)
        self.align_size = align_size

    @property
    def needs_teacher(self) -> bool:
        return "vis" in self.weights

    @property
    def n_cluster_views(self) -> int:
        return 2 if "clu" in self.weights else 0

    def forward(self, out: dict, teacher_embed: list[torch.Tensor] | None, boxes: torch.Tensor,
                flips: torch.Tensor, has_neg: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Args: model outputs, teacher vision embeddings of the global views, [B, V, 4] crop boxes, [B, V] flips,
        and, when the batch carries hard-negative captions (their embeddings follow the B positives in
        ``out["text_embed"]``), their [B] validity.

        Returns: dict with every computed term, ``loss`` (weighted sum) and ``logit_scale`` (for logging).
        """
        terms: dict[str, torch.Tensor] = {}
        if "xm" in self.weights:
            b = out["image_embed"].shape[0]
            text = out["text_embed"]
            negatives = (text[b:], has_neg) if has_neg is not None else (None, None)
            terms.update(self.xm(out["image_embed"], text[:b], out["logit_scale"], *negatives))
        if "vis" in self.weights:
            terms.update(self.vis(out["vision_embed"], teacher_embed))
        if "clu" in self.weights:
            terms.update(self._clustering(out["cluster_logits"], boxes, flips))
        total = sum(self.weights[k] * v for k, v in terms.items())
        return {**terms, "loss": total, "logit_scale": out["logit_scale"].detach()}

    def _clustering(self, logits: list[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor):
        probs = [lg.float().softmax(1) for lg in logits[:2]]  # 2 x [B, C, h, w]
        local_a, local_b, valid = overlap_boxes(boxes[:, 0], boxes[:, 1])
        a = align_to_box(probs[0], local_a, flips[:, 0], self.align_size)  # [B, C, S, S]
        b = align_to_box(probs[1], local_b, flips[:, 1], self.align_size)
        c = a.shape[1]
        a = a[valid].permute(0, 2, 3, 1).reshape(-1, c)
        b = b[valid].permute(0, 2, 3, 1).reshape(-1, c)
        if a.shape[0] == 0:  # no overlapping pair in this batch: a zero that keeps the graph connected
            return {"clu": 0.0 * (probs[0].sum() + probs[1].sum())}
        return self.clu(a, b)


class EMATeacher(nn.Module):
    """Momentum copy of the image encoder and vision head (no gradients; updated in place)."""

    def __init__(self, image_encoder: nn.Module, vision_head: nn.Module):
        super().__init__()
        self.image_encoder = copy.deepcopy(image_encoder).requires_grad_(False)
        self.vision_head = copy.deepcopy(vision_head).requires_grad_(False)

    @torch.no_grad()
    def forward(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Global views -> list of [B, P] L2-normalised teacher embeddings."""
        return [nn.functional.normalize(self.vision_head(self.image_encoder(v).global_token), dim=-1) for v in views]

    @torch.no_grad()
    def update(self, image_encoder: nn.Module, vision_head: nn.Module, momentum: float) -> None:
        """teacher <- m * teacher + (1 - m) * student."""
        for dst_mod, src_mod in ((self.image_encoder, image_encoder), (self.vision_head, vision_head)):
            for t, s in zip(dst_mod.parameters(), src_mod.parameters()):
                t.lerp_(s.detach().to(t.dtype), 1.0 - momentum)


def ema_momentum(step: int, total: int, base: float) -> float:
    """Cosine schedule from ``base`` to 1 over training (BYOL/DINO)."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(step, total) / max(total, 1)) + 1) / 2
