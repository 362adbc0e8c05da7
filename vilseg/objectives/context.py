"""A training step's shared, lazily computed inputs, and the module that runs every objective on them."""
from __future__ import annotations

from functools import cached_property

import torch
from torch import nn

from ..errors import ConfigError
from .base import NEEDS


class StepContext:
    """What the objectives of one step share, each piece computed once and only if some objective asks for it.

    Args:
        learner: the :class:`Learner` (its ``model`` computes embeddings; its ``text_features`` turns captions into
            text-tower features).
        batch: the collated batch on the device: ``views`` (globals first), ``boxes`` [B, V, 4], ``flips`` [B, V],
            optional ``captions``, ``neg_captions``, ``has_neg`` [B], ``masks`` [B, G, h, w].
        teacher: the shared :class:`~vilseg.objectives.teacher.EMATeacher`, or None.
        step: optimizer steps taken so far (schedules read it).
        total_steps: the run's length in optimizer steps.
    """

    def __init__(self, learner: "Learner", batch: dict, teacher=None, step: int = 0, total_steps: int = 1):
        self.learner, self.model, self.batch = learner, learner.model, batch
        self.teacher, self.step, self.total_steps = teacher, step, total_steps
        self.n_global = learner.n_global

    @property
    def global_views(self) -> list[torch.Tensor]:
        return self.batch["views"][:self.n_global]

    @property
    def local_views(self) -> list[torch.Tensor]:
        return self.batch["views"][self.n_global:]

    @cached_property
    def student_global(self) -> list:
        """Student :class:`~vilseg.models.ImageFeatures` of the clean global views."""
        return [self.model.image_encoder(v) for v in self.global_views]

    @cached_property
    def student_local(self) -> list:
        """Student features of the local views."""
        return [self.model.image_encoder(v) for v in self.local_views]

    @cached_property
    def student_corrupted(self) -> list:
        """Student features of the corrupted global views (:attr:`corrupted`)."""
        return [self.model.image_encoder(v) for v in self.corrupted[0]]

    @cached_property
    def teacher_global(self) -> list:
        """Teacher features of the clean global views (no gradient)."""
        if self.teacher is None:
            raise RuntimeError("an objective asked for the teacher, but none was built (declare 'teacher' in needs)")
        return self.teacher.encode(self.global_views)

    @cached_property
    def teacher_local(self) -> list:
        """Teacher features of the local views (no gradient)."""
        if self.teacher is None:
            raise RuntimeError("an objective asked for the teacher, but none was built (declare 'teacher' in needs)")
        return self.teacher.encode(self.local_views)

    @cached_property
    def corrupted(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(corrupted global views, their [B, 1, H, W] pixel masks): the patches of ``batch["masks"]`` replaced by
        the same place of the next image in the batch (``data.masking.fill: image``) or by random pixels
        (``noise``)."""
        if "masks" not in self.batch:
            raise RuntimeError("an objective asked for corrupted views, but the batch has no masks "
                               "(declare 'corrupted' in needs)")
        patch = self.model.image_encoder.patch_size
        views, masks = [], []
        for g, view in enumerate(self.global_views):
            mask = self.batch["masks"][:, g, None].to(view.dtype)  # [B, 1, h, w]
            mask = mask.repeat_interleave(patch, 2).repeat_interleave(patch, 3)  # [B, 1, H, W]
            if self.learner.corruption_fill == "image":
                fill = view.roll(1, dims=0)
            else:
                fill = self.model.image_encoder.normalize(torch.rand_like(view))
            views.append(torch.lerp(view, fill, mask))
            masks.append(mask)
        return views, masks

    @cached_property
    def text(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(caption embeddings [B, E], hard-negative embeddings [B, E] or None, their validity [B] or None), all
        in the joint space, L2-normalised; positives and negatives go through the text tower in one call."""
        captions = list(self.batch["captions"])
        negatives = list(self.batch.get("neg_captions") or [])
        stored = None
        if "text_features" in self.batch:  # from the shards, where they held this tower's features
            # stored as float16; float32 here (bf16 autocast on the CPU cannot concatenate float16 tensors)
            stored = (self.batch["text_features"].float(), self.batch["text_features_ok"])
            if negatives:
                stored = (torch.cat([stored[0], self.batch["neg_text_features"].float()]),
                          torch.cat([stored[1], self.batch["neg_text_features_ok"]]))
        feats = self.learner.text_features(captions + negatives, stored)
        embed = self.model.embed_text_features(feats)
        b = len(captions)
        if not negatives:
            return embed, None, None
        return embed[:b], embed[b:], self.batch["has_neg"]


class Learner(nn.Module):
    """The model and its objectives as one module: what DDP wraps, what checkpoints save, what a step calls.

    Args:
        model: a :class:`~vilseg.ViLSeg`.
        objectives: name -> :class:`~vilseg.objectives.base.Objective` (config order).
        weights: name -> weight.
        n_global: global views per sample (views[:n_global] of every batch).
        corruption_fill: "image" or "noise" (see :attr:`StepContext.corrupted`).
        text_cache: a :class:`~vilseg.training.text_cache.TextFeatureCache` for a frozen text tower, or None to run the
            tower on every batch.
    """

    def __init__(self, model: nn.Module, objectives: nn.ModuleDict, weights: dict[str, float], n_global: int = 2,
                 corruption_fill: str = "image", text_cache=None):
        super().__init__()
        if corruption_fill not in ("image", "noise"):
            raise ConfigError(f"data.masking.fill must be 'image' or 'noise', got {corruption_fill!r}")
        self.model, self.objectives, self.weights = model, objectives, dict(weights)
        self.n_global, self.corruption_fill, self.text_cache = n_global, corruption_fill, text_cache
        self.stored_features = 0  # captions whose features came from the shards (the rest: text_cache counts)

    @property
    def needs(self) -> frozenset[str]:
        """Union of the objectives' needs."""
        return frozenset().union(*(o.needs for o in self.objectives.values())) & NEEDS

    def teacher_heads(self) -> dict[str, nn.Module]:
        """Every head that the shared teacher keeps a momentum copy of, by key."""
        heads: dict[str, nn.Module] = {}
        for obj in self.objectives.values():
            heads.update(obj.teacher_heads())
        return heads

    def text_features(self, captions: list[str], stored: tuple[torch.Tensor, torch.Tensor] | None = None
                      ) -> torch.Tensor:
        """Captions -> [N, W] text-tower features: the stored ones where ``stored`` ([N, W] features, [N] present)
        has them (shards prepared with ``data_prep text-features``), the rest from the cache when the tower is
        frozen, else from the tower."""
        device = self.model.logit_scale.device
        if stored is not None and self.text_cache is not None:
            feats, present = stored
            self.stored_features += int(present.sum())
            if bool(present.all()):
                return feats.to(device).float()
            out = feats.to(device).float()
            missing = (~present).nonzero().flatten().tolist()
            out[missing] = self.text_cache([captions[i] for i in missing], device).to(out.dtype)
            return out
        if self.text_cache is not None:
            return self.text_cache(captions, device)
        tokens = {k: v.to(device) for k, v in self.model.tokenizer(captions).items()}
        return self.model.text_encoder(tokens["input_ids"], tokens.get("attention_mask"))

    def forward(self, batch: dict, teacher=None, step: int = 0, total_steps: int = 1) -> dict[str, torch.Tensor]:
        """Runs every objective on one batch.

        Returns:
            every objective's unweighted terms, plus ``loss`` (the weighted sum).
        """
        ctx = StepContext(self, batch, teacher, step, total_steps)
        terms: dict[str, torch.Tensor] = {}
        total = 0.0
        for name, objective in self.objectives.items():
            out = objective(ctx)
            total = total + sum(self.weights[name] * v for v in out.values())
            terms.update(out)
        terms["loss"] = total
        return terms

    @torch.no_grad()
    def after_step(self) -> None:
        for objective in self.objectives.values():
            objective.after_step(self.model)

    def log_values(self, step: int, total_steps: int) -> dict[str, float]:
        """Scalars the objectives want logged (temperatures, scales) at this step."""
        out: dict[str, float] = {}
        for objective in self.objectives.values():
            out.update(objective.log_values(self.model, step, total_steps))
        return out
