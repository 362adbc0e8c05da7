"""Momentum self-distillation (DINO, Caron et al. 2021): MMC's transfer of global semantics to local features."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
                      student_temp: float, teacher_temp: float) -> torch.Tensor:
    """Cross-entropy from the centred, sharpened teacher distribution of each global view to the student's
    distribution of every *other* view.

    With h_s(x_v) the student head's logits of view v (the G global views first, then the local ones), h_t(x_g) the
    teacher head's logits of global view g, c the centre and P the pairs (v, g) with v != g:

        L_msd = 1/|P| sum_{(v, g) in P} 1/B sum_b - softmax((h_t(x_g) - c)/tau_t) . log_softmax(h_s(x_v)/tau_s)

    The centre (an EMA of the teacher's logits) and a teacher temperature below the student's keep the teacher
    from collapsing to one dimension or to the uniform distribution. Computed in fp32.

    Args:
        student: V tensors [B, K] of student logits (globals first).
        teacher: G tensors [B, K] of teacher logits (no gradient flows into them).
        center: [K] centre.
        student_temp: tau_s (0.1).
        teacher_temp: tau_t (warmed up from 0.04 to 0.07 in DINO).
    """
    if len(teacher) < 1 or len(student) < 2:
        raise ValueError("self-distillation needs >= 1 teacher global view and >= 2 student views")
    with torch.autocast(device_type=center.device.type, enabled=False):
        targets = [F.softmax((t.detach().float() - center.float()) / teacher_temp, dim=-1) for t in teacher]
        log_probs = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student]
        terms = [-(q * log_probs[v]).sum(-1).mean() for g, q in enumerate(targets)
                 for v in range(len(student)) if v != g]
        return torch.stack(terms).mean()
