"""MaskCo (contrastive mask prediction, Zhao et al. 2021) as an objective, in its ViT form (methods.md section 3).

Two augmented global views of an image play the paper's query and key views. The student sees the query view with
a block of patches masked (``StepContext.corrupted``); a mask-prediction head (one transformer block and an MLP over
the student's tokens) bridges the masked and the unmasked features. The region is the masked block: the student's
predicted tokens are averaged over it (for a ViT, pooling over the masked patch block is RoIAlign's analogue),
projected and normalised into the query. The key is the same region of the image seen in the *other* view: the EMA
teacher's tokens of that view, intact, averaged over the patches that the masked block lands on there
(:func:`~vilseg.losses.region_in_view`, crops and flips undone) and projected. Each global view is the query view
once, with the other as its key view. A pair counts only if at least ``min_visible`` of the block lies inside the key
view. Negatives: a queue of earlier keys (a buffer, so checkpoints carry it, filled with the valid keys of every
process) and the teacher's keys of the key view's other regions (its four quadrants outside the region).

The queue must hold keys that the current teacher would still give: with teacher momentum m the teacher averages its
last ~1 / (1 - m) steps, and a queue of Q keys at K keys per step spans Q / K steps. MoCo's setting (65,536 keys at
256 per step, m = 0.999) spans 0.26 of the teacher's time constant. The demo's stage (m = 0.96, 128 keys per step)
keeps the same ratio with a queue of 1,024 keys (8 steps = 0.32 of 25); the 4,096 it had spanned 1.3 time constants.
``log_values`` reports the span as ``maskco/queue_span_steps``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..losses import region_contrast, region_in_view
from ..models.heads import mlp
from ..training.distributed import all_gather_no_grad, global_mean
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
        queue_size: int = 1024  # negative keys kept from earlier batches (0: none); see the module docstring
        same_image: bool = True  # the key view's other regions (quadrants) are negatives too
        min_visible: float = 0.5  # a pair counts if this much of the masked block lies inside the key view

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
        self.keys_per_step = 0.0  # running mean of the keys one enqueue adds (for the logged queue span)

    def teacher_heads(self):
        return {"maskco": self.projector}

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, valid: torch.Tensor) -> None:
        """Adds the valid keys of every process (in process order) to the ring buffer."""
        size = self.queue.shape[0]
        if size == 0:
            return
        keys = all_gather_no_grad(keys.detach().to(self.queue.dtype))
        keys = keys[all_gather_no_grad(valid.to(torch.uint8)).bool()][-size:]
        idx = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % size
        self.queue[idx] = keys
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % size)
        self.queue_len.copy_(torch.clamp(self.queue_len + len(keys), max=size))
        self.keys_per_step = 0.9 * self.keys_per_step + 0.1 * len(keys) if self.keys_per_step else float(len(keys))

    def log_values(self, model, step: int, total_steps: int) -> dict[str, float]:
        per_step = self.keys_per_step * 2  # enqueue runs once per query view; two global views
        return {"maskco/queue_span_steps": float(self.queue.shape[0]) / per_step} if per_step else {}

    def forward(self, ctx) -> dict[str, torch.Tensor]:
        if ctx.n_global < 2:
            raise ConfigError("objectives.maskco needs data.n_global >= 2 (a query view and a key view)")
        masks, boxes, flips = ctx.batch["masks"].bool(), ctx.batch["boxes"], ctx.batch["flips"]
        queue = self.queue[: int(self.queue_len)].clone() if self.options.queue_size else None
        total, count, keys = 0.0, 0, []
        for g in range(2):
            o = 1 - g  # the key view
            student, teacher = ctx.student_corrupted[g], ctx.teacher_global[o]
            mask = masks[:, g]
            region, visible = region_in_view(mask, boxes[:, g], flips[:, g], boxes[:, o], flips[:, o], teacher.grid)
            valid = (visible >= self.options.min_visible) & region.flatten(1).any(1)
            predicted = self.predictor(student.patch_tokens)  # [B, N, D]
            q = F.normalize(self.projector(pool_region(predicted, mask.flatten(1))), dim=-1)
            with torch.no_grad():
                project = ctx.teacher.heads["maskco"]
                k = F.normalize(project(pool_region(teacher.patch_tokens, region.flatten(1))), dim=-1)
                same = same_valid = None
                if self.options.same_image:
                    quadrants, same_valid = quadrant_regions(region)
                    pooled = torch.stack([pool_region(teacher.patch_tokens, quadrants[:, r]) for r in range(4)], 1)
                    same = F.normalize(project(pooled), dim=-1)  # [B, 4, dim]
            n = int(valid.sum())
            if n:
                term = region_contrast(q[valid], k[valid], queue, None if same is None else same[valid],
                                       self.options.temperature, None if same_valid is None else same_valid[valid])
                total = total + term * n
            else:
                total = total + 0.0 * q.sum()
            count += n
            keys.append((k, valid))
        for k, valid in keys:  # view by view: the queue then holds the keys in the order of the concatenated batch
            self.enqueue(k, valid)
        return {"maskco": global_mean(total, torch.tensor(float(count), device=masks.device))}
