"""Photometric augmentation of the training views, as DINO and BYOL apply it, with every draw from the sample's
numpy generator (so that a resumed stream replays exactly the same views).

DINO (Caron et al. 2021, ``main_dino.py``'s ``DataAugmentationDINO``) and BYOL (Grill et al. 2020) give each view:

- colour jitter with probability 0.8: brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, the four in a random
  order (torchvision's ``ColorJitter``);
- grayscale with probability 0.2;
- Gaussian blur with a per-view probability: 1.0 on the first global view, 0.1 on the second, 0.5 on the locals;
- solarisation with a per-view probability: 0.2 on the second global view only.

The ops are torchvision's (``transforms.v2.functional``); only the random draws are ours, because torchvision's
transforms draw from torch's global generator, which a resumed data worker does not replay.

One deviation, named: the blur's sigma range (0.1-2.0) is DINO's at 224 px; here it is scaled by ``side / 224`` so
that a 64 px view is blurred as much, relative to its size, as a 224 px one. The kernel is 10% of the side (odd, at
least 3), as BYOL's 23 px kernel at 224 px.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF


@dataclass(frozen=True)
class Photometric:
    """Per-view photometric augmentation (see the module docstring).

    Args:
        jitter: (brightness, contrast, saturation, hue) strengths.
        jitter_p: probability of the colour jitter.
        grayscale_p: probability of grayscale.
        blur_p: (first global view, other global views, local views) probabilities of the Gaussian blur.
        solarize_p: the same for solarisation (threshold 0.5 on [0, 1] pixels).
        blur_sigma: sigma range at a 224 px side (scaled with the view's side).
    """

    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    solarize_p: tuple[float, float, float] = (0.0, 0.2, 0.0)
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    @staticmethod
    def kind(index: int, n_global: int) -> int:
        """The view's slot in ``blur_p``/``solarize_p``: 0 the first global view, 1 the other globals, 2 locals."""
        return 0 if index == 0 else (1 if index < n_global else 2)

    def __call__(self, image: torch.Tensor, rng: np.random.Generator, kind: int) -> torch.Tensor:
        """[3, H, W] float image in [0, 1] -> its augmented copy (same shape, in [0, 1])."""
        # every draw is made whether or not its op applies, so the number of draws per view is constant
        jitter_on, order = rng.random() < self.jitter_p, rng.permutation(4)
        b, c, s, h = self.jitter
        factors = (rng.uniform(max(0.0, 1 - b), 1 + b), rng.uniform(max(0.0, 1 - c), 1 + c),
                   rng.uniform(max(0.0, 1 - s), 1 + s), rng.uniform(-h, h))
        gray_on = rng.random() < self.grayscale_p
        blur_on, sigma = rng.random() < self.blur_p[kind], rng.uniform(*self.blur_sigma)
        solarize_on = rng.random() < self.solarize_p[kind]
        if jitter_on:
            ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
            for i in order:
                image = ops[i](image, float(factors[i]))
        if gray_on:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        if blur_on:
            side = image.shape[-1]
            kernel = max(3, int(0.1 * side) // 2 * 2 + 1)
            sigma = float(sigma) * side / 224
            image = TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
        if solarize_on:
            image = TF.solarize(image, 0.5)
        return image.clamp(0, 1)
