"""Losses: one small module per objective; each returns a dict of named terms."""
from .clustering import IICLoss, align_to_box, overlap_boxes
from .cross_modal import CrossModalInfoNCE
from .vision_contrast import VisionContrast

__all__ = ["CrossModalInfoNCE", "IICLoss", "VisionContrast", "align_to_box", "overlap_boxes"]
