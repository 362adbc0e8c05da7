"""MMC's three objectives (masked momentum contrast): masked image modelling (mim), momentum self-distillation
(msd) and global contrast (gc). Together they pretrain the image encoder without captions ("ViL-Seg on an MMC
backbone"); any of them can also join ViL-Seg's objectives in one stage.

The student sees the corrupted global views (``StepContext.corrupted``: patch-aligned blocks of each global view
replaced, to a fraction drawn from ``data.masking.ratio``) and, for the distillation, the clean local views; the EMA
teacher sees the clean global views. Specification: ``methods.md`` section 2 (GMML-style MIM, DINO-style
distillation, MoCo v3-style contrast).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..losses import distillation_loss, global_contrast, masked_l1
from ..models.heads import mlp
from ..training.distributed import all_reduce_mean
from .base import Objective, register


@register
class MaskedImageModelling(Objective):
    """Reconstructs the corrupted pixels of each global view from the student's patch tokens: a linear head maps
    every token to its patch's p x p x 3 pixels (SimMIM's light head), scored by L1 on the corrupted pixels only
    (:func:`~vilseg.losses.masked_l1`)."""

    name = "mim"
    needs = frozenset({"corrupted"})

    @dataclass
    class Options:
        pass

    def __init__(self, model, options: Options):
        super().__init__(model, options)
        self.patch = model.image_encoder.patch_size
        self.head = nn.Linear(model.image_encoder.width, self.patch * self.patch * 3)

    def reconstruct(self, feats) -> torch.Tensor:
        """[B, N, D] patch tokens -> [B, 3, h*p, w*p] pixels (in the encoder's input normalisation)."""
        (h, w), p = feats.grid, self.patch
        pixels = self.head(feats.patch_tokens)  # [B, N, p*p*3]
        b = pixels.shape[0]
        return pixels.view(b, h, w, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, h * p, w * p)

    def forward(self, ctx) -> dict[str, torch.Tensor]:
        _, masks = ctx.corrupted
        terms = [masked_l1(self.reconstruct(f), clean, m)
                 for f, clean, m in zip(ctx.student_corrupted, ctx.global_views, masks)]
        return {"mim": torch.stack(terms).mean()}


class DINOHead(nn.Module):
    """DINO's projection head: a 3-layer MLP to a bottleneck, L2-normalised, then cosine scores against K
    prototypes (DINO's weight-normalised last layer with its norm fixed to 1).

    Args:
        in_dim: token width.
        out_dim: K, the number of prototypes (DINO: 65536; small worlds need far fewer).
        hidden: MLP hidden width.
        bottleneck: width of the normalised bottleneck.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int, bottleneck: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, D] -> [B, K] logits (cosines in [-1, 1])."""
        return F.normalize(self.mlp(x), dim=-1) @ F.normalize(self.prototypes, dim=-1).t()


@register
class SelfDistillation(Objective):
    """DINO-style momentum self-distillation (:func:`~vilseg.losses.distillation_loss`): the EMA teacher's centred,
    sharpened distribution of each clean global view is the target of the student's distribution of every other
    view (the corrupted globals and the clean locals).

    State: ``center`` [K], an EMA (``center_momentum``) of the teacher's logits averaged over every process, updated
    after each loss. Schedule: the teacher temperature rises linearly from ``warmup_teacher_temp`` to
    ``teacher_temp`` over the first ``teacher_temp_warmup`` fraction of training, then stays.
    """

    name = "msd"
    needs = frozenset({"teacher", "corrupted", "local_views"})

    @dataclass
    class Options:
        out_dim: int = 1024  # K prototypes
        hidden: int = 512  # head MLP width
        bottleneck: int = 128  # head bottleneck width
        student_temp: float = 0.1  # tau_s
        teacher_temp: float = 0.07  # tau_t after the warm-up
        warmup_teacher_temp: float = 0.04  # tau_t at step 0
        teacher_temp_warmup: float = 0.3  # fraction of training over which tau_t rises
        center_momentum: float = 0.9  # EMA of the centre

    def __init__(self, model, options: Options):
        super().__init__(model, options)
        if not 0 <= options.teacher_temp_warmup <= 1:
            raise ConfigError(f"objectives.msd.teacher_temp_warmup must be a fraction in [0, 1], "
                             f"got {options.teacher_temp_warmup}")
        self.head = DINOHead(model.image_encoder.width, options.out_dim, options.hidden, options.bottleneck)
        self.register_buffer("center", torch.zeros(options.out_dim))

    def teacher_heads(self):
        return {"msd": self.head}

    def teacher_temp(self, step: int, total_steps: int) -> float:
        """tau_t at ``step``: linear warm-up, then constant."""
        o = self.options
        warmup = o.teacher_temp_warmup * total_steps
        if step >= warmup:
            return o.teacher_temp
        return o.warmup_teacher_temp + (o.teacher_temp - o.warmup_teacher_temp) * step / warmup

    @torch.no_grad()
    def update_center(self, teacher_logits: list[torch.Tensor]) -> None:
        """c <- m c + (1 - m) * mean of the teacher logits over every view, image and process."""
        batch_mean = all_reduce_mean(torch.cat(teacher_logits).float().mean(0))
        self.center.mul_(self.options.center_momentum).add_(batch_mean, alpha=1 - self.options.center_momentum)

    def forward(self, ctx) -> dict[str, torch.Tensor]:
        globals_ = ctx.student_corrupted
        student = [self.head(f.global_token) for f in globals_ + ctx.student_local]
        with torch.no_grad():
            teacher = [ctx.teacher.heads["msd"](f.global_token) for f in ctx.teacher_global]
        tau_t = self.teacher_temp(ctx.step, ctx.total_steps)
        loss = distillation_loss(student, teacher, self.center, self.options.student_temp, tau_t)
        self.update_center(teacher)
        return {"msd": loss}

    def log_values(self, model, step: int, total_steps: int) -> dict[str, float]:
        return {"msd/teacher_temp": self.teacher_temp(step, total_steps)}


@register
class GlobalContrast(Objective):
    """MoCo v3-style global contrast (:func:`~vilseg.losses.global_contrast`): the student's predicted projection
    of each (corrupted) global view against the teacher's projection of the other clean global view, symmetrised:
    L_gc = L(q_1, k_2) + L(q_2, k_1)."""

    name = "gc"
    needs = frozenset({"teacher", "corrupted"})

    @dataclass
    class Options:
        dim: int = 128  # projection width
        hidden: int = 512  # projector and predictor hidden width
        temperature: float = 0.2  # tau

    def __init__(self, model, options: Options):
        super().__init__(model, options)
        self.projector = mlp(model.image_encoder.width, options.hidden, options.dim)
        self.predictor = mlp(options.dim, options.hidden, options.dim)

    def teacher_heads(self):
        return {"gc": self.projector}

    def forward(self, ctx) -> dict[str, torch.Tensor]:
        if ctx.n_global < 2:
            raise ConfigError("objectives.gc needs data.n_global >= 2 (it contrasts two global views)")
        feats = ctx.student_corrupted[:2]
        queries = [F.normalize(self.predictor(self.projector(f.global_token)), dim=-1) for f in feats]
        with torch.no_grad():
            keys = [F.normalize(ctx.teacher.heads["gc"](f.global_token), dim=-1) for f in ctx.teacher_global[:2]]
        tau = self.options.temperature
        return {"gc": global_contrast(queries[0], keys[1], tau) + global_contrast(queries[1], keys[0], tau)}
