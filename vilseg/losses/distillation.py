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


def embedding_distillation(predicted: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cosine distillation of embeddings: with p_i the predictions, t_i the (normalised) targets and V the valid
    pairs, ``L = 1 - 1/|V| sum_{i in V} cos(p_i, t_i)``.

    Args:
        predicted: [..., E] predictions (gradient flows; normalised here).
        targets: [..., E] normalised targets.
        valid: [...] bool.

    Returns:
        the loss; 0 (connected to the graph) when no pair is valid.
    """
    cosine = (F.normalize(predicted, dim=-1) * targets).sum(-1)
    if not valid.any():
        return 0.0 * predicted.sum()
    return 1 - cosine[valid].mean()


def region_distillation(patch_embed: torch.Tensor, boxes: torch.Tensor, targets: torch.Tensor,
                        valid: torch.Tensor) -> torch.Tensor:
    """Region distillation (CLIPSelf, Wu et al. 2024): a crop's embedding, read from the dense patch embeddings of a
    view that contains it, is pulled toward the global embedding of the crop itself.

    With e(p) the L2-normalised joint-space embedding of patch p of view v (the Segmenter's pooled naming reads the
    same), RoIAlign_r the average of e over the box r of local crop l in v (bilinear samples, torchvision's adaptive
    sampling, ``aligned=True``), t_l the teacher's L2-normalised joint-space global embedding of crop l and V the
    valid (view, crop) pairs:

        L = 1 - 1/|V| sum_{(v, l) in V} cos( RoIAlign_{r(v, l)}(e_v), t_l )

    CLIPSelf pools the raw projected tokens; this pools the normalised ones, as the Segmenter's naming does.

    Args:
        patch_embed: [B, E, h, w] normalised patch embeddings (gradient flows).
        boxes: [B, L, 4] each crop's box (x0, y0, x1, y1) in the view's [0, 1] coordinates, as displayed.
        targets: [B, L, E] normalised targets (no gradient expected).
        valid: [B, L] bool, which pairs count.

    Returns:
        the loss; 0 (connected to the graph) when no pair is valid.
    """
    from torchvision.ops import roi_align

    b, _, h, w = patch_embed.shape
    n = boxes.shape[1]
    scale = torch.tensor([w, h, w, h], dtype=patch_embed.dtype, device=patch_embed.device)
    index = torch.arange(b, dtype=patch_embed.dtype, device=patch_embed.device).repeat_interleave(n)[:, None]
    rois = torch.cat([index, boxes.reshape(-1, 4).to(patch_embed.dtype) * scale], 1)
    pooled = roi_align(patch_embed, rois, output_size=(1, 1), spatial_scale=1.0, sampling_ratio=-1,
                       aligned=True).flatten(1)  # [B * L, E]
    return embedding_distillation(pooled, targets.reshape(-1, targets.shape[-1]), valid.reshape(-1))
