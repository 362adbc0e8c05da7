"""InfoNCE losses: cross-modal (CLIP), multi-crop vision contrast (ViL-Seg) and global contrast (MoCo v3 / MMC).

Rows of this process are scored against columns gathered from every process, so that the mean over processes of
the local losses (and, through DDP's gradient averaging, of their gradients) equals the loss on the concatenated
batch. The label of local row r is ``rank * B + r``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..training.distributed import all_gather_no_grad, all_gather_with_grad, rank


def _labels(b: int, device) -> torch.Tensor:
    return torch.arange(b, device=device) + rank() * b


def cross_modal_infonce(image_embed: torch.Tensor, text_embed: torch.Tensor, logit_scale: torch.Tensor,
                        neg_text_embed: torch.Tensor | None = None, neg_valid: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """Symmetric CLIP InfoNCE (Radford et al. 2021) with optional NegCLIP hard negatives.

    With G and T the image and text embeddings gathered from every process (gradients kept, so that every
    process's negatives are trained), s the logit scale (already exponentiated) and y_r the global index of local
    row r:

        L_xm = 1/2 * ( CE(s * G_r T^T, y_r) + CE(s * T_r G^T, y_r) )

    Hard negatives (Yuksekgonul et al. 2023): N = embeddings of captions with one word swapped are appended as
    extra columns of the image->text logits, CE(s * G_r [T; N]^T, y_r); columns whose ``neg_valid`` is False (no
    swappable word) are masked out.

    Args:
        image_embed: [B, E] L2-normalised image embeddings.
        text_embed: [B, E] L2-normalised caption embeddings.
        logit_scale: scalar, exp of the learnable log scale.
        neg_text_embed: optional [B, E] hard-negative caption embeddings.
        neg_valid: [B] bool, which hard negatives exist.

    Returns:
        scalar loss.
    """
    all_img = all_gather_with_grad(image_embed)  # [W*B, E]
    all_txt = all_gather_with_grad(text_embed)
    labels = _labels(image_embed.shape[0], image_embed.device)
    logits_i = logit_scale * image_embed @ all_txt.t()  # [B, W*B]
    if neg_text_embed is not None:
        all_neg = all_gather_with_grad(neg_text_embed)  # [W*B, E]
        valid = all_gather_no_grad(neg_valid.to(all_neg.dtype)) > 0.5
        neg_logits = (logit_scale * image_embed @ all_neg.t()).masked_fill(~valid[None], float("-inf"))
        logits_i = torch.cat([logits_i, neg_logits], 1)  # [B, 2*W*B]
    logits_t = logit_scale * text_embed @ all_img.t()
    return 0.5 * (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels))


def vision_contrast(student: list[torch.Tensor], teacher: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Multi-crop InfoNCE of ViL-Seg's vision contrast: every student view against the teacher's embedding of each
    *other* global view, negatives = the teacher embeddings of the other images (from every process, no gradient).

    With u^v_b the student embedding of view v of image b (globals first, then locals), w^g_b the EMA-teacher
    embedding of global view g, both L2-normalised, and P the set of pairs (v, g) with v != g:

        L_vis = - 1/|P| sum_{(v, g) in P} 1/B sum_b log( exp(<u^v_b, w^g_b>/tau) / sum_b' exp(<u^v_b, w^g_b'>/tau) )

    Args:
        student: V tensors [B, P] (the first G are the global views).
        teacher: G tensors [B, P].
        temperature: tau (0.1 is MoCo v3/DINO-style multi-crop).
    """
    if len(teacher) < 1 or len(student) < 2:
        raise ValueError("vision contrast needs >= 1 teacher global view and >= 2 student views")
    labels = _labels(student[0].shape[0], student[0].device)
    terms = []
    for g, w in enumerate(teacher):
        keys = all_gather_no_grad(w.detach())  # [W*B, P]
        terms += [F.cross_entropy(u @ keys.t() / temperature, labels) for v, u in enumerate(student) if v != g]
    return torch.stack(terms).mean()


def global_contrast(query: torch.Tensor, key: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's contrastive loss (Chen et al. 2021), MMC's global contrast: one direction of one view pair.

    q = L2-normalised predictor output of the student for one global view, k = L2-normalised projection of the
    teacher for the *other* global view (no gradient), negatives = the keys of the other images from every process:

        L_gc(q, k) = 2 tau * CE( q k_all^T / tau, y )

    The 2 tau factor (MoCo v3) makes the gradient's scale independent of tau. Symmetrise by summing
    L_gc(q_1, k_2) + L_gc(q_2, k_1).

    Args:
        query: [B, D] L2-normalised student predictions.
        key: [B, D] L2-normalised teacher projections.
        temperature: tau (0.2 in MoCo v3 for ViTs).
    """
    keys = all_gather_no_grad(key.detach())  # [W*B, D]
    labels = _labels(query.shape[0], query.device)
    return 2 * temperature * F.cross_entropy(query @ keys.t() / temperature, labels)


def patch_text_compatibility(patches: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """PACL's compatibility of every image with every text: each text attends over the image's patches with the
    softmax of their cosines, and the attended embedding's cosine to the text is the score.

    With e_n the L2-normalised patch embeddings of an image and t a normalised text embedding:

        a_n = softmax_n(e_n . t),   phi(x, t) = cos( sum_n a_n e_n , t )

    Args:
        patches: [P, N, E] normalised patch embeddings of P images.
        text: [T, E] normalised text embeddings.

    Returns:
        [P, T] scores.
    """
    sim = torch.einsum("pne,te->ptn", patches, text)
    pooled = torch.einsum("ptn,pne->pte", sim.softmax(-1), patches)
    return (F.normalize(pooled, dim=-1) * text[None]).sum(-1)


def patch_aligned_infonce(patches: torch.Tensor, text_embed: torch.Tensor, logit_scale: torch.Tensor,
                          neg_text_embed: torch.Tensor | None = None, neg_valid: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """PACL (Mukhoti et al., CVPR 2023): CLIP's symmetric InfoNCE with the patch-level compatibility
    :func:`patch_text_compatibility` in place of the global embeddings' cosine, so that the patches themselves are
    aligned with the caption:

        L = 1/2 * ( CE(s * phi(X_r, T), y_r) + CE(s * phi(X, T_r)^T, y_r) )

    over the images X and captions T of every process (gradients kept, as :func:`cross_modal_infonce`), with the
    NegCLIP hard negatives appended to the image->text columns as there.

    Args:
        patches: [B, N, E] normalised patch embeddings of this process's images.
        text_embed: [B, E] normalised caption embeddings.
        logit_scale: scalar, exp of the learnable log scale.
        neg_text_embed, neg_valid: optional hard negatives [B, E] and their validity [B].
    """
    all_patches = all_gather_with_grad(patches)
    all_txt = all_gather_with_grad(text_embed)
    labels = _labels(patches.shape[0], patches.device)
    logits_i = logit_scale * patch_text_compatibility(patches, all_txt)  # [B, W*B]
    if neg_text_embed is not None:
        all_neg = all_gather_with_grad(neg_text_embed)
        valid = all_gather_no_grad(neg_valid.to(all_neg.dtype)) > 0.5
        neg_logits = (logit_scale * patch_text_compatibility(patches, all_neg)).masked_fill(~valid[None], float("-inf"))
        logits_i = torch.cat([logits_i, neg_logits], 1)
    logits_t = logit_scale * patch_text_compatibility(all_patches, text_embed).t()  # [B, W*B]
    return 0.5 * (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels))
