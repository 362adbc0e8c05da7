"""Cross-modal contrast (CLIP, Radford et al. 2021)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_gather_with_grad, rank


class CrossModalInfoNCE(nn.Module):
    """Symmetric InfoNCE between image and caption embeddings with negatives from every process.

    With G = gathered image embeddings, T = gathered text embeddings, s = exp(logit_scale) clamped at 100
    (the model applies the clamp), and the local rows r of this process:

        L_xm = 1/2 * ( CE(s * G_r T^T, y_r) + CE(s * T_r G^T, y_r) ),   y_r = global index of each local pair

    Averaged over processes this equals the loss on the concatenated batch; gathered embeddings keep their
    gradients, so every process's negatives are trained.

    Optional hard negatives (NegCLIP, Yuksekgonul et al. 2023): N = embeddings of captions with one word swapped
    (``vilseg.data.stream.swap_word``) are appended as extra columns of the image->text logits,
    CE(s * G_r [T; N]^T, y_r), with invalid ones (no swappable word) masked out.
    """

    def forward(self, image_embed: torch.Tensor, text_embed: torch.Tensor, logit_scale: torch.Tensor,
                neg_text_embed: torch.Tensor | None = None, neg_valid: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """Args: [B, E] L2-normalised image and text embeddings, scalar scale; optional [B, E] hard-negative text
        embeddings with [B] bool validity. Returns ``{"xm": loss}``."""
        all_img = all_gather_with_grad(image_embed)  # [W*B, E]
        all_txt = all_gather_with_grad(text_embed)
        b = image_embed.shape[0]
        labels = torch.arange(b, device=image_embed.device) + rank() * b
        logits_i = logit_scale * image_embed @ all_txt.t()  # [B, W*B]
        if neg_text_embed is not None:
            all_neg = all_gather_with_grad(neg_text_embed)  # [W*B, E]
            valid = all_gather_with_grad(neg_valid.to(all_neg.dtype)) > 0.5
            neg_logits = (logit_scale * image_embed @ all_neg.t()).masked_fill(~valid[None], float("-inf"))
            logits_i = torch.cat([logits_i, neg_logits], 1)  # [B, 2*W*B]
        logits_t = logit_scale * text_embed @ all_img.t()
        return {"xm": 0.5 * (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels))}
