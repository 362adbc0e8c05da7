"""One EMA teacher shared by every objective that asks for one: the image encoder plus registered heads."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


class EMATeacher(nn.Module):
    """Momentum copy of the image encoder and of the heads objectives register (no gradients; updated in place).

    Args:
        image_encoder: the student's image encoder.
        heads: key -> student head; the teacher keeps a copy of each under ``heads[key]``.
    """

    def __init__(self, image_encoder: nn.Module, heads: dict[str, nn.Module]):
        super().__init__()
        self.image_encoder = copy.deepcopy(image_encoder).requires_grad_(False)
        self.heads = nn.ModuleDict({k: copy.deepcopy(h).requires_grad_(False) for k, h in heads.items()})

    @torch.no_grad()
    def encode(self, views: list[torch.Tensor]) -> list:
        """Views -> list of :class:`~vilseg.models.ImageFeatures` of the teacher encoder."""
        return [self.image_encoder(v) for v in views]

    @torch.no_grad()
    def update(self, image_encoder: nn.Module, heads: dict[str, nn.Module], momentum: float) -> None:
        """teacher <- m * teacher + (1 - m) * student, for the encoder and every registered head."""
        pairs = [(self.image_encoder, image_encoder)] + [(self.heads[k], heads[k]) for k in self.heads]
        for dst_mod, src_mod in pairs:
            for t, s in zip(dst_mod.parameters(), src_mod.parameters()):
                t.lerp_(s.detach().to(t.dtype), 1.0 - momentum)


def ema_momentum(step: int, total: int, base: float, final: float = 1.0) -> float:
    """Cosine schedule of the teacher momentum from ``base`` at step 0 to ``final`` at ``total`` (BYOL/DINO)."""
    progress = min(max(step, 0), total) / max(total, 1)
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2
