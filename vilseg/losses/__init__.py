"""Losses as pure functions: tensors in, a scalar out, the formula in each docstring.

Objectives (:mod:`vilseg.objectives`) own the heads, state and schedules; these functions own the maths. Every one is
tested against a naive loop implementation, forward and gradient (``tests/test_losses.py``).
"""
from .clustering import align_to_box, box_in_view, iic_loss, overlap_boxes, patch_centres_in, region_in_view
from .contrastive import (cross_modal_infonce, global_contrast, patch_aligned_infonce, patch_text_compatibility,
                          vision_contrast)
from .distillation import distillation_loss, embedding_distillation, region_distillation
from .reconstruction import masked_l1
from .regions import attentive_pool, grouping_loss, region_contrast, slot_contrast

__all__ = ["align_to_box", "attentive_pool", "box_in_view", "cross_modal_infonce", "distillation_loss",
           "embedding_distillation", "global_contrast", "grouping_loss", "iic_loss", "masked_l1", "overlap_boxes",
           "patch_aligned_infonce", "patch_centres_in", "patch_text_compatibility", "region_contrast",
           "region_distillation", "region_in_view", "slot_contrast", "vision_contrast"]
