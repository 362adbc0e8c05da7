"""mIoU exactly as mmsegmentation computes it: intersection and union histograms summed over the whole dataset.

Per image, pixels labelled ``ignore_index`` are dropped; then I_c = #(pred == label == c), P_c = #(pred == c),
L_c = #(label == c). Summed over the dataset, IoU_c = I_c / (P_c + L_c - I_c) (NaN when the union is empty, i.e. the
class is neither present nor predicted anywhere), mIoU = nanmean_c IoU_c. Predictions outside [0, C) count nowhere.
"""
from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255


class IoUAccumulator:
    """Dataset-level intersection/union histograms (mmseg's ``intersect_and_union`` summed over images)."""

    def __init__(self, n_classes: int, ignore_index: int = IGNORE_INDEX):
        self.n, self.ignore = n_classes, ignore_index
        self.inter = np.zeros(n_classes, np.int64)
        self.pred = np.zeros(n_classes, np.int64)
        self.label = np.zeros(n_classes, np.int64)

    def update(self, pred: np.ndarray, label: np.ndarray) -> None:
        """Adds one image: [H, W] predicted and true labels (same size; ground truth is never resized)."""
        pred, label = np.asarray(pred), np.asarray(label)
        if pred.shape != label.shape:
            raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in size")
        keep = label != self.ignore
        pred, label = pred[keep].astype(np.int64), label[keep].astype(np.int64)
        inside = (pred >= 0) & (pred < self.n)
        self.inter += np.bincount(pred[inside & (pred == label)], minlength=self.n)[: self.n]
        self.pred += np.bincount(pred[inside], minlength=self.n)[: self.n]
        self.label += np.bincount(label[(label >= 0) & (label < self.n)], minlength=self.n)[: self.n]

    def merge(self, other: "IoUAccumulator") -> None:
        self.inter += other.inter
        self.pred += other.pred
        self.label += other.label

    def state(self) -> np.ndarray:
        return np.stack([self.inter, self.pred, self.label])

    def iou(self) -> np.ndarray:
        """Per-class IoU (NaN where the union is empty)."""
        union = self.pred + self.label - self.inter
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, self.inter / np.maximum(union, 1), np.nan)

    def miou(self) -> float:
        iou = self.iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def miou_present(self) -> float:
        """mIoU over the classes that occur in the ground truth. A class the labels never show would enter
        :meth:`miou` at IoU 0 as soon as one pixel is predicted as it, a 1/C penalty whatever the pixel count; its
        false positives already lower the IoU of the classes those pixels belong to. On a split that holds every
        class the two are equal; calibration scores with this one (its split may lack classes of the vocabulary)."""
        iou = self.iou()[self.label > 0]
        return float(np.mean(iou)) if iou.size else float("nan")


def markdown_table(per_class: dict[str, float], miou: float, title: str = "") -> str:
    """A Markdown table of per-class IoU (%) with the mIoU last."""
    lines = ([f"**{title}**", ""] if title else []) + ["| class | IoU (%) |", "|---|---|"]
    lines += [f"| {name} | {'n/a' if iou != iou else f'{iou:.2f}'} |" for name, iou in per_class.items()]
    lines.append(f"| **mIoU** | **{miou:.2f}** |")
    return "\n".join(lines)
