"""MaskCo (contrastive mask prediction, Zhao et al. 2021) as an objective, in its ViT form (methods.md section 3).

The student sees each global view with a block of patches masked (``StepContext.corrupted``); a mask-prediction
head (one transformer block and an MLP over the student's tokens) bridges the masked and the unmasked features. The
region is the masked block: the student's predicted tokens are averaged over it (for a ViT, pooling over the masked
patch block is RoIAlign's analogue; a convolutional feature map would use ``torchvision.ops.roi_align`` on the
block's box), projected and normalised into the query. The EMA teacher's tokens of the same view, intact, averaged
over the same block and projected, are the positive key. Negatives: a queue of earlier keys (a buffer, so
checkpoints carry it, filled with the keys of every process) and the teacher's keys of the same image's other
regions (the four quadrants outside the block).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_gather_no_grad
from ..losses import region_contrast
from ..models.heads import mlp
from .base import Objective, register


def pool_region(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, N, D] tokens, [B, N] 0/1 weights -> [B, D] weighted means (zeros where the weights are all 0)."""
    mask = mask.to(tokens.dtype)
    return (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)


def quadrant_regions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, h, w] masked block -> ([B, 4, h*w] the four quadrants outside the block, [B, 4] non-empty)."""
    b, h, w = mask.shape
    ys = torch.arange(h, device=mask.device)[:, None] < h // 2
    xs = torch.arange(w, device=mask.device)[None] < w // 2
    quads = torch.stack([ys & xs, ys & ~xs, ~ys & xs, ~ys & ~xs])  # [4, h, w]
    regions = (quads[None] & ~mask[:, None].bool()).flatten(2)  # [B, 4, h*w]
    return regions, regions.any(-1)


@register
class MaskCo(Objective):
    """Region-level InfoNCE between the predicted masked region and the teacher's intact region
    (:func:`~vilseg.losses.region_contrast`), on every global view.

    State: ``queue`` [queue_size, dim] of earlier keys, ``queue_ptr`` (next slot) and ``queue_len`` (slots filled),
    all buffers.
    """

    name = "maskco"
    needs = frozenset({"teacher", "corrupted"})

    @dataclass
    class Options:
        dim: int = 128  # projection width
        hidden: int = 512  # projector and prediction-head hidden width
        temperature: float = 0.2  # tau
        queue_size: int = 4096  # negative keys kept from earlier batches (0: none)
        same_image: bool = True  # the same image's other regions (quadrants) are negatives too

    def __init__(self, model, options: Options):
        super().__init__(model, options)
        from timm.models.vision_transformer import Block

        width = model.image_encoder.width
        heads = max(1, width // 64)
        self.predictor = nn.Sequential(Block(width, heads), nn.LayerNorm(width))  # the mask-prediction head
        self.projector = mlp(width, options.hidden, options.dim)
        self.register_buffer("queue", torch.zeros(options.queue_size, options.dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_len", torch.zeros((), dtype=torch.long))

    def teacher_heads(self):
        return {"maskco": self.projector}

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Adds the keys of every process (in process order) to the ring buffer."""
        size = self.queue.shape[0]
        if size == 0:
            return
        keys = all_gather_no_grad(keys.detach().to(self.queue.dtype))[-size:]
        idx = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % size
        self.queue[idx] = keys
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % size)
        self.queue_len.copy_(torch.clamp(self.queue_len + len(keys), max=size))

    def forward(self, ctx) -> dict[str, torch.Tensor]:
        masks = ctx.batch["masks"]  # [B, G, h, w]
        queue = self.queue[: int(self.queue_len)].clone() if self.options.queue_size else None
        terms, keys = [], []
        for g, (student, teacher) in enumerate(zip(ctx.student_corrupted, ctx.teacher_global)):
            mask = masks[:, g]
            flat = mask.flatten(1)
            predicted = self.predictor(student.patch_tokens)  # [B, N, D]
            q = F.normalize(self.projector(pool_region(predicted, flat)), dim=-1)
            with torch.no_grad():
                project = ctx.teacher.heads["maskco"]
                k = F.normalize(project(pool_region(teacher.patch_tokens, flat)), dim=-1)
                same = valid = None
                if self.options.same_image:
                    regions, valid = quadrant_regions(mask)
                    pooled = torch.stack([pool_region(teacher.patch_tokens, regions[:, r]) for r in range(4)], 1)
                    same = F.normalize(project(pooled), dim=-1)  # [B, 4, dim]
            terms.append(region_contrast(q, k, queue, same, self.options.temperature, valid))
            keys.append(k)
        for k in keys:  # view by view: the queue then holds the keys in the order of the concatenated batch
            self.enqueue(k)
        return {"maskco": torch.stack(terms).mean()}
