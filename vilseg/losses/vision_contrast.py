"""Global/local vision contrast against an EMA teacher (ViL-Seg's vision-based contrasting; multi-crop InfoNCE)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_gather_no_grad, rank


class VisionContrast(nn.Module):
    """Multi-crop InfoNCE: every student view against the teacher's embedding of each *other* global view.

    u^v_b = student embedding of view v of image b (global or local crop), w^g_b = EMA-teacher embedding of global
    view g, both L2-normalised; negatives are the teacher embeddings of the other images (from every process):

        L_vis = - 1/|pairs| sum_{(v, g), v != g} 1/B sum_b log( exp(<u^v_b, w^g_b>/tau) / sum_b' exp(<u^v_b, w^g_b'>/tau) )

    Args:
        temperature: tau_v (0.1 by default, as in MoCo v3/DINO-style multi-crop contrast).
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Args: student list of V [B, P] embeddings (globals first), teacher list of G [B, P]. Returns ``{"vis"}``."""
        if len(teacher) < 1 or len(student) < 2:
            raise ValueError("vision contrast needs >= 1 teacher global view and >= 2 student views")
        b = student[0].shape[0]
        labels = torch.arange(b, device=student[0].device) + rank() * b
        terms = []
        for g, w in enumerate(teacher):
            keys = all_gather_no_grad(w.detach())  # [W*B, P]
            for v, u in enumerate(student):
                if v == g:
                    continue
                terms.append(F.cross_entropy(u @ keys.t() / self.temperature, labels))
        return {"vis": torch.stack(terms).mean()}
