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
    """

    def forward(self, image_embed: torch.Tensor, text_embed: torch.Tensor, logit_scale: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        """Args: [B, E] L2-normalised image and text embeddings, scalar scale. Returns ``{"xm": loss}``."""
        all_img = all_gather_with_grad(image_embed)  # [W*B, E]
        all_txt = all_gather_with_grad(text_embed)
        b = image_embed.shape[0]
        labels = torch.arange(b, device=image_embed.device) + rank() * b
        logits_i = logit_scale * image_embed @ all_txt.t()  # [B, W*B]
        logits_t = logit_scale * text_embed @ all_img.t()
        return {"xm": 0.5 * (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels))}
