"""Patch-aligned block masks for masked image modelling (GMML / BEiT-style block-wise masking)."""
from __future__ import annotations

import math

import numpy as np


class BlockMasking:
    """Draws rectangular blocks of patches until a drawn fraction of the patch grid is covered.

    For each mask, a target fraction r is drawn uniformly from ``ratio``; blocks of random area (at least
    ``min_block`` patches, never more than what is still missing) and random aspect ratio are added at random
    positions (overlaps allowed, as in BEiT) until round(r * N) of the N patches are covered. When no block fits
    after a few tries, single random patches finish the job, so the masked count always equals its target and the
    masked fraction stays inside ``ratio`` (up to the rounding to whole patches).

    Args:
        grid: (h, w) patch grid of the view to corrupt.
        ratio: (low, high) range of the masked fraction, 0 <= low <= high <= 1.
        min_block: smallest block, in patches.
        aspect: (low, high) range of block aspect ratios (height / width), drawn log-uniformly.
    """

    def __init__(self, grid: tuple[int, int], ratio=(0.5, 0.75), min_block: int = 4, aspect=(0.3, 1 / 0.3)):
        low, high = (float(r) for r in ratio)
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"masking ratio must satisfy 0 <= low <= high <= 1, got {ratio!r}")
        if min_block < 1:
            raise ValueError(f"min_block must be >= 1 patch, got {min_block!r}")
        self.grid, self.ratio, self.min_block = tuple(grid), (low, high), int(min_block)
        self.log_aspect = (math.log(aspect[0]), math.log(aspect[1]))

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """Returns an [h, w] bool mask, True where a patch is corrupted."""
        h, w = self.grid
        mask = np.zeros((h, w), bool)
        target = int(round(rng.uniform(*self.ratio) * h * w))
        count, failures = 0, 0
        while count < target and failures < 10:
            missing = target - count
            area = rng.uniform(min(self.min_block, missing), missing)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            bh = min(h, max(1, round(math.sqrt(area * aspect))))
            bw = min(w, max(1, round(math.sqrt(area / aspect))))
            top, left = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
            block = np.zeros_like(mask)
            block[top:top + bh, left:left + bw] = True
            new = int((block & ~mask).sum())
            if 0 < new <= missing:
                mask |= block
                count += new
            else:
                failures += 1
        if count < target:  # finish with single patches
            free = np.flatnonzero(~mask.ravel())
            mask.ravel()[rng.choice(free, size=target - count, replace=False)] = True
        return mask
