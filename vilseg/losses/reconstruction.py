"""Masked image modelling's reconstruction loss (GMML, Atito et al. 2021; SimMIM, Xie et al. 2022)."""
from __future__ import annotations

import torch

from ..training.distributed import all_reduce_sum, world_size


def masked_l1(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the corrupted pixels only.

    With M the pixel mask (1 where the input was corrupted), x the clean image and x_hat the reconstruction:

        L_mim = sum_{b,c,i,j} M_bij |x_hat_bcij - x_bcij| / (C * sum_{b,i,j} M_bij)

    Under W processes the denominator is the mean over processes of their masked-pixel counts (masks differ in
    size from image to image), so that DDP's average of the per-process losses is the loss of the concatenated batch.

    Args:
        prediction: [B, C, H, W] reconstruction.
        target: [B, C, H, W] clean image (no gradient needed).
        mask: [B, 1, H, W] or [B, H, W] in {0, 1} (bool or float), 1 where corrupted.

    Returns:
        scalar loss (0 if nothing was corrupted, with the graph kept).
    """
    if mask.dim() == 3:
        mask = mask[:, None]
    mask = mask.to(prediction.dtype)
    per_pixel = (prediction - target.detach()).abs() * mask
    count = all_reduce_sum(mask.sum().detach()) / world_size()  # the mean count per process
    return per_pixel.sum() / (count * prediction.shape[1]).clamp_min(1.0)
