"""The geometry of the evaluation protocols, as functions that tests can check against protocols.md's formulas.

Both lineages resize every image keeping its aspect ratio (mmcv's ``imrescale``), then slide a square window over it
(mmseg's ``slide_inference``: windows clamped to the border, no padding, overlapping logits averaged).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def rescale_size(height: int, width: int, short: int, long: int = 2048) -> tuple[int, int]:
    """Output (height, width) of a keep-ratio resize that fits the short side in ``short`` and the long side in
    ``long``: scale = min(long / max(h, w), short / min(h, w)), each side int(side * scale + 0.5)."""
    if min(height, width) <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    scale = min(long / max(height, width), short / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def sliding_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Every window as (y1, y2, x1, x2), rows first: grids = max(size - crop + stride - 1, 0) // stride + 1 per axis;
    a window starts at i * stride, ends at min(start + crop, size), and is moved back to start at max(end - crop, 0),
    so windows never leave the image and an image smaller than ``crop`` is one window."""
    if crop <= 0 or stride <= 0:
        raise ValueError(f"crop and stride must be positive, got crop={crop}, stride={stride}")
    h_grids = max(height - crop + stride - 1, 0) // stride + 1
    w_grids = max(width - crop + stride - 1, 0) // stride + 1
    out = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y2, x2 = min(hi * stride + crop, height), min(wi * stride + crop, width)
            out.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return out


def resize_image(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, h, w] float in [0, 1], bilinear with half-pixel centres and no anti-aliasing (OpenCV's
    INTER_LINEAR, which mmcv uses; the result is rounded to uint8 levels as OpenCV's output is)."""
    x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None]
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).round().clamp(0, 255)
    return x[0] / 255.0
