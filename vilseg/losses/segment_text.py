"""Segment-word contrast: cross-modal InfoNCE between the clustering head's segments and caption words."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_gather_no_grad, all_gather_with_grad, rank


def segment_word_similarity(seg_embed: torch.Tensor, seg_valid: torch.Tensor, tok_embed: torch.Tensor,
                            tok_valid: torch.Tensor) -> torch.Tensor:
    """sim[i, j] = mean over caption j's words l of max over image i's segments c of <S_ic, T_jl>.

    Args: [I, C, E] normalised segment embeddings with [I, C] validity; [J, L, E] normalised word embeddings with
    [J, L] validity. Returns [I, J]. An image's invalid segments never win the max; a caption's invalid positions
    (padding, start/end tokens) do not enter the mean.
    """
    sims = torch.einsum("ice,jle->ijcl", seg_embed, tok_embed)  # [I, J, C, L]
    sims = sims.masked_fill(~seg_valid[:, None, :, None], -2.0)
    best = sims.amax(2)  # [I, J, L]: every word's best segment
    w = tok_valid.to(best.dtype)
    return (best * w[None]).sum(-1) / w.sum(-1).clamp_min(1.0)[None]


class SegmentWordContrast(nn.Module):
    """Fine-grained cross-modal contrast at the level of the clustering head's segments (FILIP-style late
    interaction, with segments instead of patches).

    Every image's patches are pooled into C soft segments by the clustering head's assignment A [N, C]:
    S_c = normalise(sum_n A_nc z_n) over the normalised joint-space patch embeddings z_n. A caption's words are the
    text tower's token features in the same joint space. Image i and caption j score

        sim(i, j) = mean_{l in words(j)} max_{c: mass_c >= 1 patch} <S_ic, T_jl>

    and, with s the (clamped) logit scale, G/T the images/captions gathered from every process (with gradients)
    and r the local rows, as the global contrast:

        L_seg = 1/2 * ( CE(s * sim(G_r, [T; N]), y_r) + CE(s * sim(G, T_r)^T, y_r) )

    N are the hard-negative captions (swapped words), masked where invalid. A word ("circle") can only be matched
    by one segment, so the segment that holds the object must itself encode what the word says: the patches of an
    object, not the whole image, learn its shape. The model detaches the assignment: trained through this term it
    collapses to a single segment (the whole image), so the clustering loss alone decides the segments.
    """

    def forward(self, seg_embed: torch.Tensor, seg_valid: torch.Tensor, tok_embed: torch.Tensor,
                tok_valid: torch.Tensor, logit_scale: torch.Tensor, neg_tok_embed: torch.Tensor | None = None,
                neg_tok_valid: torch.Tensor | None = None, neg_valid: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """Args: [B, C, E] segments, [B, C] validity, [B, L, E] words, [B, L] validity, scalar scale, optional
        hard negatives ([B, L, E], [B, L], [B] validity). Returns ``{"seg": loss}``."""
        all_seg = all_gather_with_grad(seg_embed)
        all_seg_valid = all_gather_no_grad(seg_valid.float()) > 0.5
        all_tok = all_gather_with_grad(tok_embed)
        all_tok_valid = all_gather_no_grad(tok_valid.float()) > 0.5
        b = seg_embed.shape[0]
        labels = torch.arange(b, device=seg_embed.device) + rank() * b
        logits_i = logit_scale * segment_word_similarity(seg_embed, seg_valid, all_tok, all_tok_valid)  # [B, W*B]
        if neg_tok_embed is not None:
            all_neg = all_gather_with_grad(neg_tok_embed)
            all_neg_tv = all_gather_no_grad(neg_tok_valid.float()) > 0.5
            valid = all_gather_no_grad(neg_valid.float()) > 0.5
            neg = logit_scale * segment_word_similarity(seg_embed, seg_valid, all_neg, all_neg_tv)
            logits_i = torch.cat([logits_i, neg.masked_fill(~valid[None], float("-inf"))], 1)
        logits_t = logit_scale * segment_word_similarity(all_seg, all_seg_valid, tok_embed, tok_valid).t()  # [B, W*B]
        return {"seg": 0.5 * (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels))}
