"""CLIPSelf (Wu et al., ICLR 2024): a CLIP's dense features learn to name image regions as its image embedding
names their crops.

As the authors' code does it (wusize/CLIPSelf, ``src/training/clipself.py`` with the ``grid_distill`` data of
``src/training/data.py`` and the ``v2`` extraction of ``src/open_clip/transformer.py``), for each image:

- a grid of m x n cells is drawn, (m, n) uniformly among m in 1..M, n in ceil(m/2)..min(2m, M) (``max_split`` M,
  their default 6); at most ``max_boxes`` cells (their default 20), a random subset, are kept;
- the teacher, a frozen copy of the *initial* CLIP, embeds each cell's crop: the cell resized so that its shorter
  side is the teacher's input size and centre-cropped (the teacher's own preprocessing), then class token ->
  ``ln_post`` -> ``proj``;
- the student's dense features are MaskCLIP's read-out of its last block (``forward_without_attn``: the value path
  with the residual and feed-forward), through ``ln_post`` and ``proj``, each L2-normalised, then RoIAligned over the
  cell (one bin, adaptive sampling, ``aligned=True``, in feature-map coordinates);
- the loss is 1 - cosine between the two, averaged over all kept cells of the batch.

Deviations, named: the cells are cut from the student's input view (vilseg's first global view, already at the
training resolution) rather than from the original image file, and resized with RoIAlign's bilinear sampling
rather than PIL's bicubic resize (the authors crop the full-resolution image). The grid choice and the cell subset
use torch's generator (the authors: Python's ``random``). Everything else (teacher, read-out, pooling, loss) is
theirs.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from ..errors import ConfigError
from ..models import readouts
from ..models.image_encoder import tokens_to_map
from ..training.distributed import global_mean
from .base import Objective, register


def grid_choices(max_split: int) -> list[tuple[int, int]]:
    """CLIPSelf's (rows, columns) choices: m in 1..M, n in ceil(m/2)..min(2m, M)."""
    return [(m, n) for m in range(1, max_split + 1) for n in range((m + 1) // 2, min(2 * m, max_split) + 1)]


def grid_boxes(rows: int, cols: int) -> torch.Tensor:
    """[rows * cols, 4] cells (x0, y0, x1, y1) of the unit square, in raster order."""
    ys, xs = torch.linspace(0, 1, rows + 1), torch.linspace(0, 1, cols + 1)
    y0, x0 = torch.meshgrid(ys[:-1], xs[:-1], indexing="ij")
    y1, x1 = torch.meshgrid(ys[1:], xs[1:], indexing="ij")
    return torch.stack([x0, y0, x1, y1], -1).reshape(-1, 4)


def centre_square(boxes: torch.Tensor) -> torch.Tensor:
    """[K, 4] pixel boxes -> their centred squares of side min(width, height): what a resize of the shorter side
    followed by a centre crop keeps."""
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    half = torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / 2
    return torch.stack([cx - half, cy - half, cx + half, cy + half], 1)


@register
class CLIPSelf(Objective):
    """Region distillation from a frozen copy of the initial CLIP into the student's MaskCLIP dense features (see the
    module docstring). The teacher is built from the model when the objective is (the start of the stage), so it is
    the CLIP the stage starts from."""

    name = "clipself"
    needs = frozenset()

    @dataclass
    class Options:
        max_split: int = 6  # M: grids of up to M x M cells (the authors' default)
        max_boxes: int = 20  # cells kept per image, a random subset (the authors' default)
        crop_size: int = 0  # the teacher's input side for a cell; 0: the model's image size

    def __init__(self, model, options: Options):
        super().__init__(model, options)
        if options.max_split < 1 or options.max_boxes < 1 or options.crop_size < 0:
            raise ConfigError(f"objectives.clipself: max_split and max_boxes must be >= 1 and crop_size >= 0, got "
                              f"{options.max_split}, {options.max_boxes}, {options.crop_size}")
        if model.image_encoder.pool != "token" or model.image_encoder.vit.cls_token is None:
            raise ConfigError("objectives.clipself distils a CLIP's class-token embedding: start the model from a "
                              "CLIP (model.overrides.clip)")
        # the frozen initial image tower: submodules without gradients (no optimizer state, ignored by DDP), moved
        # with the learner and saved in its checkpoints; never exported with the model
        self.teacher_encoder = copy.deepcopy(model.image_encoder).requires_grad_(False).eval()
        self.teacher_proj = copy.deepcopy(model.image_proj).requires_grad_(False).eval()
        self.choices = grid_choices(options.max_split)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher_encoder.eval()  # frozen: no dropout, no drop-path
        return self

    def model_parts(self) -> set[str]:
        return {"image_encoder"}

    def sample_cells(self, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cells [K, 4] in the unit square, [K] image index of each): a grid per image, at most max_boxes cells."""
        picks = torch.randint(len(self.choices), (batch,)).tolist()
        cells, owner = [], []
        for b, pick in enumerate(picks):
            boxes = grid_boxes(*self.choices[pick])
            boxes = boxes[torch.randperm(len(boxes))[:self.options.max_boxes]]
            cells.append(boxes)
            owner.append(torch.full((len(boxes),), b, dtype=torch.long))
        return torch.cat(cells).to(device), torch.cat(owner).to(device)

    @torch.no_grad()
    def teacher_targets(self, view: torch.Tensor, cells: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """[K, E] the frozen CLIP's normalised embedding of every cell's crop."""
        _, _, height, width = view.shape
        size = self.options.crop_size or self.teacher_encoder.vit.patch_embed.img_size[0]
        pixels = cells * torch.tensor([width, height, width, height], device=view.device, dtype=view.dtype)
        rois = torch.cat([owner[:, None].to(view.dtype), centre_square(pixels)], 1)
        crops = roi_align(view, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        return F.normalize(self.teacher_proj(self.teacher_encoder(crops).global_token), dim=-1)

    def forward(self, ctx) -> dict[str, torch.Tensor]:
        view = ctx.global_views[0]
        cells, owner = self.sample_cells(view.shape[0], view.device)
        targets = self.teacher_targets(view, cells, owner)
        feats = ctx.model.image_encoder(view, readout=readouts.maskclip)
        dense = tokens_to_map(ctx.model.embed_patches(feats.readout_tokens), feats.grid)  # [B, E, h, w], normalised
        h, w = feats.grid
        boxes = cells * torch.tensor([w, h, w, h], device=view.device, dtype=dense.dtype)
        rois = torch.cat([owner[:, None].to(dense.dtype), boxes], 1)
        pooled = roi_align(dense, rois, (1, 1), spatial_scale=1.0, sampling_ratio=-1, aligned=True)[..., 0, 0]
        cosine = (F.normalize(pooled, dim=-1) * targets).sum(-1)  # [K]
        count = torch.tensor(float(len(cosine)), device=view.device)
        # the mean over every process's cells (DDP = one process on the whole batch)
        return {"clipself": global_mean((1.0 - cosine).sum(), count)}
