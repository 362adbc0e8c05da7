"""Two ways to teach the patch embeddings what the image embedding knows: region distillation (``dense``) and
patch-aligned contrast with the captions (``pacl``).

Region distillation (``dense``) teaches the patch embeddings what the image embedding knows, so that a segment
named by its pooled patch embeddings is named as well as by re-encoding it. After CLIPSelf (Wu et al., ICLR 2024),
and the dense reading of MMC's "transferring semantics from global to local features".

For every local crop and every global view that contains it (at least ``min_inside`` of the crop's area), the
student's joint-space patch embeddings of the global view are RoIAligned over the crop's box (the flip undone) and
pulled, by cosine, toward the EMA teacher's joint-space global embedding of the local crop itself
(:func:`~vilseg.losses.region_distillation`). The student's global views are already forwarded for the other
objectives; the added cost is the teacher's forward of the (small) local views, one RoIAlign and one projection.

Deviations from CLIPSelf, named: the teacher is the shared EMA teacher, not a frozen copy of the initial CLIP (here
nothing is pretrained: the joint space is learnt in the same stage, from the captions); the crops are the multi-crop
local views (CLIPSelf: a grid of patches of the image); the pooled embeddings are the normalised patch embeddings,
as the Segmenter's pooled naming reads them (CLIPSelf pools the raw projected tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..losses import box_in_view, patch_aligned_infonce, region_distillation
from ..models.image_encoder import tokens_to_map
from ..training.distributed import global_mean
from .base import Objective, register


@register
class RegionDistillation(Objective):
    """Region distillation from each local crop's global embedding into the global views' patch embeddings."""

    name = "dense"
    needs = frozenset({"local_views", "teacher"})

    @dataclass
    class Options:
        min_inside: float = 0.7  # a (global view, local crop) pair counts if this much of the crop is in the view

    def __init__(self, model, options: Options):
        super().__init__(model, options)
        if not 0 < options.min_inside <= 1:
            raise ConfigError(f"objectives.dense.min_inside must be in (0, 1], got {options.min_inside}")
        # the joint projection is the model's (exported with it); kept as a plain reference, not a submodule
        object.__setattr__(self, "_proj", model.image_proj)

    def model_parts(self) -> set[str]:
        return {"image_encoder", "image_proj"}

    def teacher_heads(self):
        return {"dense": self._proj}

    def forward(self, ctx) -> dict[str, torch.Tensor]:
        if not ctx.local_views:
            raise ConfigError("objectives.dense needs local views: set data.n_local >= 1")
        g, boxes, flips = ctx.n_global, ctx.batch["boxes"], ctx.batch["flips"]
        with torch.no_grad():
            project = ctx.teacher.heads["dense"]
            targets = torch.stack([F.normalize(project(f.global_token), dim=-1) for f in ctx.teacher_local], 1)
        maps, local_boxes, valid = [], [], []
        for v, feats in enumerate(ctx.student_global):
            maps.append(tokens_to_map(ctx.model.embed_patches(feats.patch_tokens), feats.grid))
            box, inside = box_in_view(boxes[:, g:], boxes[:, v:v + 1], flips[:, v:v + 1].expand(-1, boxes.shape[1] - g))
            local_boxes.append(box)
            valid.append(inside >= self.options.min_inside)
        valid = torch.cat(valid)
        loss = region_distillation(torch.cat(maps), torch.cat(local_boxes), targets.repeat(g, 1, 1), valid)
        count = valid.sum().float()  # the mean over the pairs of every process (DDP = one process on the whole batch)
        return {"dense": global_mean(loss * count, count)}


@register
class PatchTextAlignment(Objective):
    """PACL's patch-aligned contrast (:func:`~vilseg.losses.patch_aligned_infonce`) between the caption's view's
    joint-space patch embeddings (normalised, as the Segmenter's pooled naming reads them) and its caption, with the
    hard-negative captions when the data makes them. It shares the model's logit scale with ``xm``.

    Deviation from PACL, named: PACL trains a vision embedder on a frozen CLIP's patch tokens; here the patch
    embeddings are the model's own joint projection of its patch tokens, trained with the encoder."""

    name = "pacl"
    needs = frozenset({"captions"})

    @dataclass
    class Options:
        pass

    def model_parts(self) -> set[str]:
        return {"image_encoder", "image_proj", "text_encoder", "text_proj", "logit_scale"}

    def forward(self, ctx) -> dict[str, torch.Tensor]:
        patches = ctx.model.embed_patches(ctx.student_global[0].patch_tokens)
        text, negatives, valid = ctx.text
        return {"pacl": patch_aligned_infonce(patches, text, ctx.model.logit_scale.exp(), negatives, valid)}
