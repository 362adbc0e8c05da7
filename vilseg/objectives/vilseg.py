"""ViL-Seg's three objectives: cross-modal contrast (xm), vision contrast (vis) and online clustering (clu)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..losses import align_to_box, cross_modal_infonce, iic_loss, overlap_boxes, vision_contrast
from ..models.heads import mlp
from .base import Objective, register

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp: a temperature below 0.01 destabilises training


@register
class CrossModal(Objective):
    """CLIP's symmetric InfoNCE between the global image embedding of view 0 and its caption
    (:func:`~vilseg.losses.cross_modal_infonce`), with the batch's hard-negative captions when the data makes them.

    After every optimizer step the model's log logit scale is clamped to [0, ln 100] (open_clip does the same):
    clamping the parameter itself, rather than its value in the forward pass, keeps its gradient alive at the bound,
    so a scale that reached 100 can come back down.
    """

    name = "xm"
    needs = frozenset({"captions"})

    @dataclass
    class Options:
        pass

    def model_parts(self) -> set[str]:
        return {"image_encoder", "image_proj", "text_encoder", "text_proj", "logit_scale"}

    def forward(self, ctx) -> dict[str, torch.Tensor]:
        image = ctx.model.embed_image(ctx.student_global[0].global_token)
        text, negatives, valid = ctx.text
        return {"xm": cross_modal_infonce(image, text, ctx.model.logit_scale.exp(), negatives, valid)}

    def after_step(self, model) -> None:
        model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    def log_values(self, model, step: int, total_steps: int) -> dict[str, float]:
        return {"logit_scale": float(model.logit_scale.detach().exp())}


@register
class VisionContrast(Objective):
    """ViL-Seg's vision contrast: every view's global token (globals and locals) through a head, against the EMA
    teacher's embedding of each other global view (:func:`~vilseg.losses.vision_contrast`)."""

    name = "vis"
    needs = frozenset({"local_views", "teacher"})

    @dataclass
    class Options:
        temperature: float = 0.1  # tau_v
        dim: int = 128  # output width of the head
        hidden: int = 512  # hidden width of the head

    def __init__(self, model, options: Options):
        super().__init__(model, options)
        self.head = mlp(model.image_encoder.width, options.hidden, options.dim)

    def teacher_heads(self):
        return {"vis": self.head}

    def forward(self, ctx) -> dict[str, torch.Tensor]:
        feats = ctx.student_global + ctx.student_local
        student = [F.normalize(self.head(f.global_token), dim=-1) for f in feats]
        with torch.no_grad():
            head = ctx.teacher.heads["vis"]
            teacher = [F.normalize(head(f.global_token), dim=-1) for f in ctx.teacher_global]
        return {"vis": vision_contrast(student, teacher, self.options.temperature)}


@register
class Clustering(Objective):
    """ViL-Seg's online clustering: IIC mutual information (:func:`~vilseg.losses.iic_loss`) between the
    clustering head's assignments of the first two global views, RoIAligned onto their overlap (flip undone).

    The clustering head is part of the model (inference reads it). ``detach`` feeds it detached patch tokens, so the
    term trains the head only and never the encoder: at the demo's budget, the end-to-end term trains the encoder
    towards colour and erases the shape that captions teach (docs/experiments/, sixth and seventh sessions).
    """

    name = "clu"
    needs = frozenset()

    @dataclass
    class Options:
        iic_lambda: float = 1.0  # IIC's entropy weight
        align_size: int = 8  # side of the RoIAligned overlap grid the pairs are sampled on
        detach: bool = False  # train the clustering head only (detached patch tokens)

    def model_parts(self) -> set[str]:
        return {"cluster_head"} if self.options.detach else {"cluster_head", "image_encoder"}

    def forward(self, ctx) -> dict[str, torch.Tensor]:
        if ctx.n_global < 2:
            raise ConfigError("objectives.clu needs data.n_global >= 2 (two overlapping global views)")
        logits = [ctx.model.cluster_logits(f, detach=self.options.detach) for f in ctx.student_global[:2]]
        probs = [lg.float().softmax(1) for lg in logits]  # 2 x [B, C, h, w]
        boxes, flips = ctx.batch["boxes"], ctx.batch["flips"]
        local_a, local_b, valid = overlap_boxes(boxes[:, 0], boxes[:, 1])
        size = self.options.align_size
        # 2 samples per cell and side: the setting every measured ViL-Seg run used (SlotCon adapts them to the box)
        a = align_to_box(probs[0], local_a, flips[:, 0], size, sampling_ratio=2)  # [B, C, S, S]
        b = align_to_box(probs[1], local_b, flips[:, 1], size, sampling_ratio=2)
        c = a.shape[1]
        a = a[valid].permute(0, 2, 3, 1).reshape(-1, c)
        b = b[valid].permute(0, 2, 3, 1).reshape(-1, c)
        # iic_loss runs even with no overlapping pair here (its joint matrix is summed over processes); the zero
        # term keeps every probability in the graph, so DDP sees a gradient for the head on every process
        loss = iic_loss(a, b, self.options.iic_lambda)
        return {"clu": loss + 0.0 * (probs[0].sum() + probs[1].sum())}
