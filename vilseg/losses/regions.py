"""Region- and slot-level losses: MaskCo's region contrast, SlotCon's grouping loss and slot contrast."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def region_contrast(q: torch.Tensor, k_pos: torch.Tensor, queue: torch.Tensor | None = None,
                    same_image: torch.Tensor | None = None, temperature: float = 0.2,
                    same_valid: torch.Tensor | None = None) -> torch.Tensor:
    """MaskCo's region-level InfoNCE (Zhao et al. 2021).

    For each region r with query q_r (the student's prediction for the masked region), positive key k_r (the EMA
    teacher's feature of the same region in the intact view), the negatives of the key queue Q and the other
    regions' keys of the same image N_r:

        L = mean_r - log( exp(q_r.k_r / tau) / ( exp(q_r.k_r / tau) + sum_{k in Q} exp(q_r.k / tau)
                                                 + sum_{k in N_r} exp(q_r.k / tau) ) )

    Args:
        q: [B, D] L2-normalised queries (gradient flows).
        k_pos: [B, D] L2-normalised positive keys (no gradient expected).
        queue: [Q, D] L2-normalised negative keys from earlier batches, or None.
        same_image: [B, R, D] L2-normalised keys of R other regions of the same image, or None.
        temperature: tau.
        same_valid: [B, R] bool, which same-image regions exist (the others are left out of the sum).
    """
    logits = [(q * k_pos).sum(-1, keepdim=True)]
    if queue is not None and len(queue):
        logits.append(q @ queue.t())
    if same_image is not None and same_image.shape[1]:
        same = torch.einsum("bd,brd->br", q, same_image)
        if same_valid is not None:
            same = same.masked_fill(~same_valid, float("-inf"))
        logits.append(same)
    logits = torch.cat(logits, 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def grouping_loss(student_dots: torch.Tensor, teacher_dots: torch.Tensor, center: torch.Tensor,
                  student_temp: float = 0.1, teacher_temp: float = 0.07) -> torch.Tensor:
    """SlotCon's cross-view grouping loss (Wen et al. 2022): the teacher's centred, sharpened assignment of each
    aligned pixel to the K prototypes is the target of the student's assignment of the same pixel in the other view.

    With s_i, t_i the [K] prototype scores (cosines) of aligned pixel i in the student's and the teacher's view and
    c the centre:

        L = mean_i - sum_k softmax((t_i - c) / tau_t)_k * log softmax(s_i / tau_s)_k

    Args:
        student_dots: [B, K, H, W] student scores, aligned to the shared box (gradient flows).
        teacher_dots: [B, K, H, W] teacher scores of the other view, aligned the same way.
        center: [K] (or broadcastable [1, K, 1, 1]) centre of the teacher scores.
        student_temp, teacher_temp: tau_s, tau_t.
    """
    center = center.view(1, -1, 1, 1) if center.dim() == 1 else center
    target = ((teacher_dots - center) / teacher_temp).softmax(1)
    return -(target * (student_dots / student_temp).log_softmax(1)).sum(1).mean()


def slot_contrast(queries: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor,
                  temperature: float = 0.2) -> torch.Tensor:
    """SlotCon's slot contrast: each valid student slot against every valid teacher slot of the other view (gathered
    from every process), the positive being the same image's slot of the same prototype; scaled by 2 * tau as the
    authors do, which keeps its gradient scale independent of tau:

        L = 2 tau * mean_n CE( q_n K^T / tau, y_n )

    Every process must call it; with no valid query it returns a zero that keeps the graph connected.

    Args:
        queries: [N, D] L2-normalised predicted student slots.
        keys: [M, D] L2-normalised teacher slots (every process's valid slots, in process order).
        labels: [N] index into ``keys`` of each query's positive.
        temperature: tau.
    """
    if len(queries) == 0:
        return 0.0 * queries.sum()
    return F.cross_entropy(queries @ keys.t() / temperature, labels) * (2 * temperature)


def attentive_pool(features: torch.Tensor, dots: torch.Tensor, temperature: float = 0.07,
                   eps: float = 1e-6) -> torch.Tensor:
    """SlotCon's slots: attention of every pixel over the K prototypes, A = softmax_K(dots / tau) + eps, then each
    slot the attention-weighted mean of the projected features, slot_k = sum_i A_ki x_i / sum_i A_ki.

    Args:
        features: [B, D, H, W] projected dense features.
        dots: [B, K, H, W] prototype scores.

    Returns:
        [B, K, D] slots.
    """
    attn = (dots / temperature).softmax(1) + eps
    return torch.einsum("bkhw,bdhw->bkd", attn, features) / attn.sum((2, 3))[..., None]
