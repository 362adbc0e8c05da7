"""Evaluation on folders of images and label masks, with mIoU computed exactly as mmsegmentation does.

Dataset layout (what ``data_prep.synthetic`` writes): ``ROOT/images/*.png``, ``ROOT/masks/*.png`` (uint8 labels,
255 ignored) and ``ROOT/meta.json`` with ``classes`` (index 0 = background) and optional ``synonyms``.

    python -m vilseg.evaluate --model runs/demo/train/final --data data/demo/eval --out runs/demo/eval
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

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
        if pred.shape != label.shape:
            raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in size")
        keep = label != self.ignore
        pred, label = pred[keep].astype(np.int64), label[keep].astype(np.int64)
        self.inter += np.bincount(pred[pred == label], minlength=self.n)[: self.n]
        self.pred += np.bincount(pred, minlength=self.n)[: self.n]
        self.label += np.bincount(label, minlength=self.n)[: self.n]

    def iou(self) -> np.ndarray:
        """Per-class IoU (NaN where the union is empty)."""
        union = self.pred + self.label - self.inter
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, self.inter / np.maximum(union, 1), np.nan)

    def miou(self) -> float:
        return float(np.nanmean(self.iou()))


def load_split(root: str | Path) -> tuple[list[tuple[str, Path, Path]], dict]:
    """Returns [(key, image path, mask path)] and meta.json of an evaluation folder."""
    root = Path(root)
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: an evaluation folder needs images/, masks/, meta.json")
    meta = json.loads(meta_path.read_text())
    items = []
    for image in sorted((root / "images").glob("*.png")):
        mask = root / "masks" / image.name
        if not mask.is_file():
            raise FileNotFoundError(f"mask {mask} for image {image} does not exist")
        items.append((image.stem, image, mask))
    if not items:
        raise FileNotFoundError(f"no images under {root / 'images'}")
    return items, meta


@torch.no_grad()
def class_scores(segmenter, items) -> list[tuple[torch.Tensor, np.ndarray]]:
    """[(Q x H x W upsampled scores, H x W labels)] for every item (scores computed once, thresholds vary); the
    Segmenter's own read-out path (:meth:`~vilseg.inference.Segmenter.score_maps`)."""
    out = []
    for _, image_path, mask_path in tqdm(items, desc="scoring", mininterval=2, leave=False):
        scores, _ = segmenter.score_maps(image_path)
        out.append((scores, np.asarray(Image.open(mask_path))))
    return out


def predict(scores: torch.Tensor, threshold: float) -> np.ndarray:
    """Arg-max over [bg = threshold, Q scores] (a constant background channel, as TCL)."""
    best, idx = scores.max(0)
    return torch.where(best > threshold, idx + 1, 0).numpy()


def score_split(scored, n_classes: int, threshold: float) -> IoUAccumulator:
    acc = IoUAccumulator(n_classes)
    for scores, label in scored:
        acc.update(predict(scores, threshold), label)
    return acc


def calibrate_threshold(scored, n_classes: int, grid=None) -> tuple[float, dict[float, float]]:
    """Background threshold that maximises mIoU on a labelled calibration split; returns (best, sweep)."""
    grid = grid if grid is not None else np.round(np.arange(-0.2, 0.85, 0.05), 3)
    sweep = {float(t): score_split(scored, n_classes, float(t)).miou() for t in grid}
    return max(sweep, key=sweep.get), sweep


def chance_accumulator(items, n_classes: int, seed: int = 0) -> IoUAccumulator:
    """A predictor that labels every pixel uniformly at random among background and the classes."""
    rng = np.random.default_rng(seed)
    acc = IoUAccumulator(n_classes)
    for _, _, mask_path in items:
        label = np.asarray(Image.open(mask_path))
        acc.update(rng.integers(0, n_classes, size=label.shape), label)
    return acc


def write_overlays(segmenter, items, out_dir: Path, n: int) -> list[str]:
    from .overlay import render_overlay

    names = ["background", *segmenter.index.classes]
    paths = []
    for key, image_path, mask_path in items[:n]:
        result = segmenter.segment(image_path)
        truth = np.asarray(Image.open(mask_path)).astype(np.int64)
        paths.append(str(render_overlay(Image.open(image_path).convert("RGB"), result.labels, names,
                                        out_dir / f"{key}.png", truth=truth)))
    return paths


def main(argv: list[str] | None = None) -> dict:
    from .inference import ReadOut, Segmenter

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--vocabulary", choices=("canonical", "synonym"), default="canonical")
    parser.add_argument("--overlays", type=int, default=8)
    args = parser.parse_args(argv)
    items, meta = load_split(args.data)
    names = meta["classes"][1:]
    queries = [meta["synonyms"][n] for n in names] if args.vocabulary == "synonym" else names
    seg = Segmenter.from_pretrained(args.model, vocabulary=queries)  # the model's saved read-out, if any
    threshold = seg.readout.threshold if seg.readout.threshold is not None else ReadOut().threshold
    acc = score_split(class_scores(seg, items), len(names) + 1, threshold)
    out = Path(args.out)
    metrics = {"miou": 100 * acc.miou(), "readout": seg.readout.__dict__,
               "per_class_iou": {n: 100 * float(v) for n, v in zip(meta["classes"], acc.iou())}}
    metrics["overlays"] = write_overlays(seg, items, out / "overlays", args.overlays)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps({"miou": metrics["miou"]}))
    return metrics


if __name__ == "__main__":
    main()
