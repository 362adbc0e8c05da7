"""SlotCon (semantic grouping, Wen et al. 2022) as an objective (methods.md section 4), written from the paper's
description and the specification; the authors' public code was read to check details, not copied.

A dense projector maps the encoder's patch tokens to a D-dim space; K learnable prototypes score every patch
(cosine ``dots``). Two terms, over the first two global views:

- grouping: the EMA teacher's centred, sharpened prototype assignment of each pixel of one view is the target of the
  student's assignment of the same pixel in the other view; both maps are RoIAligned onto the views' overlap with
  the flip undone (:func:`~vilseg.losses.align_to_box`, RoIAlign with adaptive sampling as the authors use it), and
  pairs without an overlap are left out;
- slot contrast: slots are the attention-weighted means of the projected patches, raw as the projector gives them
  (attention = softmax over the prototypes); a slot is valid in a view if its prototype is the arg-max at one patch
  at least. Each student slot valid in both views, through a predictor, is contrasted against every valid teacher
  slot of the other view, gathered from all processes; the positive is the same image's slot of the same prototype.

Total (unweighted terms): 0.5 (G12 + G21) + 0.5 (C12 + C21). Means are taken over the pixels / slots of every
process (each process's sum divided by the global count, times the world size for DDP's gradient averaging), so two
processes train exactly as one on the concatenated batch. State: ``center`` [K], an EMA of the teacher's dots.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..losses import align_to_box, attentive_pool, grouping_loss, overlap_boxes, slot_contrast
from ..models.heads import mlp
from ..training.distributed import all_gather_no_grad, all_reduce_mean, global_mean, rank
from .base import Objective, register


def valid_slots(dots: torch.Tensor) -> torch.Tensor:
    """[B, K, h, w] -> [B, K] bool: the prototype is the arg-max of at least one patch."""
    b, k = dots.shape[:2]
    hits = F.one_hot(dots.argmax(1).flatten(1), k).sum(1)  # [B, K]
    return hits > 0


@register
class SlotCon(Objective):
    """SlotCon's grouping loss and slot contrast (:func:`~vilseg.losses.grouping_loss`,
    :func:`~vilseg.losses.slot_contrast`)."""

    name = "slotcon"
    needs = frozenset({"teacher"})

    @dataclass
    class Options:
        hidden: int = 512  # slot-predictor hidden width
        student_temp: float = 0.1  # tau_s of the grouping loss
        teacher_temp: float = 0.07  # tau_t of the grouping loss (and of the attentive pooling)
        contrast_temp: float = 0.2  # tau of the slot contrast
        center_momentum: float = 0.9  # EMA of the teacher dots' centre
        align_size: int = 8  # side of the RoIAligned overlap grid
        group_weight: float = 0.5  # weight of 0.5 (G12 + G21) ... (the paper: equal halves)
        slot_weight: float = 0.5  # ... and of 0.5 (C12 + C21)

    def __init__(self, model, options: Options):
        super().__init__(model, options)
        if getattr(model, "slot_head", None) is None:
            raise ConfigError("objectives.slotcon needs a model with prototypes: set model.overrides.n_prototypes "
                             "(SlotCon's K; the paper uses 256 on COCO) and optionally prototype_dim")
        # the head is part of the model (exported with it, read by the Segmenter's slots grouping); kept here as a
        # plain reference, not a submodule, so that its tensors appear once in checkpoints
        object.__setattr__(self, "_head", model.slot_head)
        dim = model.slot_head.prototypes.shape[1]
        self.slot_predictor = mlp(dim, options.hidden, dim)
        self.register_buffer("center", torch.zeros(model.slot_head.prototypes.shape[0]))

    def model_parts(self) -> set[str]:
        return {"image_encoder", "slot_head"}

    def teacher_heads(self):
        return {"slotcon": self._head}

    @torch.no_grad()
    def update_center(self, teacher_dots: list[torch.Tensor]) -> None:
        """c <- m c + (1 - m) * mean of the teacher dots over views, images, pixels and processes."""
        batch = all_reduce_mean(torch.stack([d.float().mean((0, 2, 3)) for d in teacher_dots]).mean(0))
        self.center.mul_(self.options.center_momentum).add_(batch, alpha=1 - self.options.center_momentum)

    def contrast(self, q_slots, q_valid, k_slots, k_valid) -> torch.Tensor:
        """C(student view -> teacher view): [B, K, D] slots and [B, K] validity of each side."""
        b, k, _ = q_slots.shape
        chosen = (q_valid & k_valid).flatten()  # query slots valid in both views
        queries = F.normalize(self.slot_predictor(q_slots.flatten(0, 1)[chosen]), dim=-1)
        keys_valid = all_gather_no_grad(k_valid.flatten().to(torch.uint8)).bool()  # [W * B * K]
        keys = all_gather_no_grad(F.normalize(k_slots.flatten(0, 1), dim=-1))[keys_valid]
        global_index = torch.arange(b * k, device=q_slots.device)[chosen] + rank() * b * k
        labels = keys_valid.long().cumsum(0)[global_index] - 1  # the positive's row among the valid keys
        loss = slot_contrast(queries, keys, labels, self.options.contrast_temp)
        return global_mean(loss * len(queries), torch.tensor(float(len(queries)), device=loss.device))

    def forward(self, ctx) -> dict[str, torch.Tensor]:
        if ctx.n_global < 2:
            raise ConfigError("objectives.slotcon needs data.n_global >= 2 (two overlapping global views)")
        o = self.options
        student = [ctx.model.slot_head(f.patch_tokens, f.grid) for f in ctx.student_global[:2]]
        with torch.no_grad():
            teacher = [ctx.teacher.heads["slotcon"](f.patch_tokens, f.grid) for f in ctx.teacher_global[:2]]
        # grouping, on the overlap of the two views
        boxes, flips = ctx.batch["boxes"], ctx.batch["flips"]
        local = overlap_boxes(boxes[:, 0], boxes[:, 1])
        valid = local[2]
        group = 0.0
        for a, b in ((0, 1), (1, 0)):
            s = align_to_box(student[a][1], local[a], flips[:, a], o.align_size)[valid]
            with torch.no_grad():
                t = align_to_box(teacher[b][1], local[b], flips[:, b], o.align_size)[valid]
            pixels = s.shape[0] * o.align_size ** 2
            term = grouping_loss(s, t, self.center, o.student_temp, o.teacher_temp) * pixels if len(s) \
                else 0.0 * student[a][1].sum()
            group = group + global_mean(term, torch.tensor(float(pixels), device=s.device))
        # slot contrast
        slots_s = [attentive_pool(x, d, o.teacher_temp) for x, d in student]
        with torch.no_grad():
            slots_t = [attentive_pool(x, d, o.teacher_temp) for x, d in teacher]
        valid_s = [valid_slots(d) for _, d in student]
        valid_t = [valid_slots(d) for _, d in teacher]
        slot = self.contrast(slots_s[0], valid_s[0], slots_t[1], valid_t[1]) + \
            self.contrast(slots_s[1], valid_s[1], slots_t[0], valid_t[0])
        self.update_center([d for _, d in teacher])
        return {"slotcon_group": o.group_weight * group, "slotcon_slot": o.slot_weight * slot}
