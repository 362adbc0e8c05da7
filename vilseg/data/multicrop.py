"""Multi-crop augmentation that records every crop's box and flip, so that views can be aligned later."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from ..errors import ConfigError


def random_resized_box(rng: np.random.Generator, width: int, height: int, scale: tuple[float, float],
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[float, float, float, float]:
    """RandomResizedCrop's box sampler (Szegedy et al.), drawing from ``rng`` instead of torch's global RNG.

    torchvision's ``RandomResizedCrop.get_params`` uses the global generator; a per-worker numpy generator keeps
    the stream reproducible for exact resumption. Returns (x0, y0, x1, y1) in pixels (floats).
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if w <= width and h <= height:
            x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
            return x0, y0, x0 + w, y0 + h
    side = min(width, height)  # fallback: central square
    x0, y0 = (width - side) / 2, (height - side) / 2
    return x0, y0, x0 + side, y0 + side


class MultiCrop:
    """``n_global`` crops at ``global_size`` and ``n_local`` crops at ``local_size``, with random horizontal flips
    and, optionally, DINO's photometric augmentation of each view (:class:`~vilseg.data.augment.Photometric`).

    Args:
        global_size, local_size: output sides in pixels (multiples of the patch size).
        n_global, n_local: number of crops of each kind (globals come first in the output).
        global_scale, local_scale: area fractions of the source image for each kind.
        flip_p: probability of a horizontal flip per crop.
        mean, std: normalisation (the model's ``image.mean``/``image.std``).
        photometric: the photometric augmentation, or None (crops and flips only).
        intact_first: leave view 0 photometrically intact (it is paired with the caption, and captions name
            colours); the other views are still augmented.
    """

    def __init__(self, global_size: int, local_size: int, n_global: int = 2, n_local: int = 4,
                 global_scale=(0.5, 1.0), local_scale=(0.1, 0.4), flip_p: float = 0.5,
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), photometric=None, intact_first: bool = False):
        if n_global < 1:
            raise ConfigError("data.n_global must be >= 1 (view 0 is paired with the caption)")
        self.n_global, self.n_local = n_global, n_local
        self.photometric, self.intact_first = photometric, intact_first
        self.specs = [(global_size, tuple(global_scale))] * n_global + [(local_size, tuple(local_scale))] * n_local
        self.flip_p = flip_p
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: Image.Image, rng: np.random.Generator):
        """Returns (views: list of [3, S, S] float tensors, boxes: [V, 4] in [0, 1] source coords, flips: [V] bool)."""
        width, height = image.size
        views, boxes, flips = [], [], []
        for index, (size, scale) in enumerate(self.specs):
            x0, y0, x1, y1 = random_resized_box(rng, width, height, scale)
            crop = image.resize((size, size), Image.BILINEAR, box=(x0, y0, x1, y1))
            flip = bool(rng.random() < self.flip_p)
            if flip:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            array = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1)
            if self.photometric is not None and not (index == 0 and self.intact_first):
                array = self.photometric(array, rng, self.photometric.kind(index, self.n_global))
            views.append((array - self.mean) / self.std)
            boxes.append([x0 / width, y0 / height, x1 / width, y1 / height])
            flips.append(flip)
        return views, torch.tensor(boxes, dtype=torch.float32), torch.tensor(flips)
