"""The evaluator: a dense predictor, a dataset and a protocol in; mIoU, per-class IoU and every resolved setting out.

Per image (protocols.md): keep-ratio resize (:func:`rescale_size`), sliding windows (:func:`sliding_windows`) whose
name scores are upsampled to the window, summed and divided by the per-pixel window count, then upsampled bilinearly
to the original image size (ground truth is never resized), optionally refined by PAMR, and turned into labels by the
protocol's rule. Intersections and unions are summed over the dataset (:class:`IoUAccumulator`). With several
processes (``accelerate launch``) the images are split between them and the histograms summed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .datasets import Dataset
from .geometry import resize_image, rescale_size, sliding_windows
from .metrics import IoUAccumulator, markdown_table
from .protocols import Protocol

FALLBACK_BG_THRESHOLD = 0.5  # TCL's constant channel, for a model without a calibrated threshold


@torch.no_grad()
def image_name_scores(predictor, image: np.ndarray, protocol: Protocol, batch: int = 16) -> torch.Tensor:
    """[H, W, 3] uint8 image -> [T, H, W] score of every query name at every original pixel."""
    height, width = image.shape[:2]
    short, crop, stride = protocol.geometry(predictor.size)
    h, w = rescale_size(height, width, short, protocol.long)
    x = resize_image(image, (h, w))
    windows = sliding_windows(h, w, crop, stride)
    preds = count = None
    for start in range(0, len(windows), batch):
        chunk = windows[start:start + batch]
        crops = torch.stack([x[:, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
        scores = predictor(crops).float().cpu()
        if preds is None:
            preds = torch.zeros(scores.shape[1], h, w)
            count = torch.zeros(1, h, w)
        for (y1, y2, x1, x2), s in zip(chunk, scores):
            preds[:, y1:y2, x1:x2] += s
            count[:, y1:y2, x1:x2] += 1
    preds = preds / count
    out = F.interpolate(preds[None], size=(height, width), mode="bilinear", align_corners=False)
    if protocol.pamr:
        from .pamr import pamr

        out = pamr(torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None], out)
    return out[0]


def class_maxima(name_scores: torch.Tensor, owner: torch.Tensor, n_classes: int, empty: float) -> torch.Tensor:
    """[T, H, W] per-name maps -> [C, H, W]: each class the max over its names; ``empty`` for classes without one."""
    out = torch.full((n_classes, *name_scores.shape[1:]), empty, dtype=name_scores.dtype)
    for c in torch.unique(owner).tolist():
        out[c] = name_scores[owner == c].amax(0)
    return out


def decide(name_scores: torch.Tensor, owner: torch.Tensor, n_classes: int, protocol: Protocol,
           background: bool, bg_threshold: float | None) -> np.ndarray:
    """The protocol's rule: [T, H, W] name scores -> [H, W] labels."""
    if protocol.rule == "argmax":
        scores = class_maxima(name_scores, owner, n_classes, float("-inf"))
        if background and bg_threshold is not None:
            scores[0] = bg_threshold  # a constant background channel (TCL)
        labels = scores.max(0).indices
    else:
        probs = (protocol.logit_scale * name_scores).softmax(0)
        scores = class_maxima(probs, owner, n_classes, 0.0)
        if protocol.area_thd is not None:
            area = torch.bincount(scores.max(0).indices.flatten(), minlength=n_classes)[1:].float()
            keep = (area > protocol.area_thd * area.sum()).to(scores.dtype)
            scores[1:] *= keep[:, None, None]
        labels = scores.max(0).indices
        labels[scores.amax(0) < protocol.prob_thd] = 0
    return labels.numpy().astype(np.uint8 if n_classes <= 255 else np.int64)


def resolve_threshold(protocol: Protocol, predictor) -> tuple[float | None, str]:
    if protocol.bg_threshold == "model":
        calibrated = predictor.calibrated_threshold()
        if calibrated is not None:
            return float(calibrated), "the model's calibrated threshold (readout.json)"
        return FALLBACK_BG_THRESHOLD, "no calibrated threshold: TCL's 0.5"
    if protocol.bg_threshold is None:
        return None, "none"
    return float(protocol.bg_threshold), "protocol"


def process_state():
    """accelerate's process state. Without an accelerator it is asked for the CPU explicitly, so that a multi-process
    launch forms a gloo group (as in vilseg/train.py) instead of leaving every process on its own."""
    try:
        from accelerate import PartialState
    except ImportError:  # an inference-only install: one process
        from types import SimpleNamespace

        return SimpleNamespace(num_processes=1, process_index=0, is_main_process=True, device=torch.device("cpu"))
    no_accelerator = not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
                          or torch.backends.mps.is_available())
    return PartialState(cpu=no_accelerator)


def _process_slice(items: list) -> list:
    """This process's share of the items (all of them without a distributed launch)."""
    state = process_state()
    return items[state.process_index::state.num_processes] if state.num_processes > 1 else items


def _sum_over_processes(array: np.ndarray) -> np.ndarray:
    state = process_state()
    if state.num_processes == 1:
        return array
    t = torch.from_numpy(array).to(state.device)
    torch.distributed.all_reduce(t)
    return t.cpu().numpy()


def _read(dataset: Dataset, item, on_error: str, skipped: list, image: bool = True):
    try:
        return (dataset.image(item) if image else None), dataset.label(item)
    except (OSError, ValueError) as exn:
        if on_error == "stop":
            raise
        skipped.append({"id": item.id, "error": str(exn)})
        return None, None


def evaluate(predictor, dataset: Dataset, protocol: Protocol, names: str | None = None, batch: int = 16,
             on_error: str = "skip", limit: int | None = None, progress: bool = True) -> dict:
    """Scores ``predictor`` on ``dataset`` under ``protocol``; returns the report (see :func:`write_report`).

    Args:
        names: name lineage or file overriding ``protocol.names`` ("A", "B", a path; "synonym" on the synthetic
            world).
        on_error: "skip" (count unreadable images and go on) or "stop" (raise, naming the file).
        limit: evaluate the first ``limit`` images only (a quick look; the report says so).
    """
    if on_error not in ("skip", "stop"):
        raise ValueError(f"on_error must be 'skip' or 'stop', got {on_error!r}")
    per_class_names = dataset.names(names or protocol.names)
    templates = protocol.template_list(predictor.default_templates)
    _, owner = predictor.set_names(per_class_names, templates)
    bg_threshold, bg_source = resolve_threshold(protocol, predictor)
    n = len(dataset.classes)
    acc, skipped = IoUAccumulator(n), []
    items = dataset.items[:limit] if limit else dataset.items
    mine = _process_slice(items)
    for item in tqdm(mine, desc=f"{dataset.name} ({protocol.name})", mininterval=2,
                     disable=None if progress else True):  # None: a bar only on a terminal
        image, label = _read(dataset, item, on_error, skipped)
        if image is None:
            continue
        if image.shape[:2] != label.shape:
            message = f"{item.image}: image is {image.shape[1]}x{image.shape[0]} but its label map " \
                      f"{item.label} is {label.shape[1]}x{label.shape[0]}"
            if on_error == "stop":
                raise ValueError(message)
            skipped.append({"id": item.id, "error": message})
            continue
        scores = image_name_scores(predictor, image, protocol, batch)
        acc.update(decide(scores, owner, n, protocol, dataset.background, bg_threshold), label)
    state = _sum_over_processes(np.concatenate([acc.state().ravel(), [len(skipped)]]))
    acc.inter, acc.pred, acc.label = (state[:-1].reshape(3, n)).astype(np.int64)
    short, crop, stride = protocol.geometry(predictor.size)
    settings = {**protocol.as_dict(), "short": short, "crop": crop, "stride": stride, "bg_threshold": bg_threshold,
                "bg_threshold_source": bg_source, "templates": list(templates),
                "names": names or protocol.names, "queried_names": per_class_names}
    report = _report(acc, dataset, settings, predictor.describe(), len(items), skipped, int(state[-1]))
    report["notes"] = background_notes(acc, dataset, protocol, per_class_names, bg_threshold)
    report["processes"] = process_state().num_processes
    report["limit"], report["split_images"] = limit, len(dataset.items)
    return report


def background_notes(acc: IoUAccumulator, dataset: Dataset, protocol: Protocol, per_class_names: list[list[str]],
                     bg_threshold: float | None) -> list[str]:
    """Why a dataset's background class scored 0, when no pixel at all was predicted background because no rule of
    the protocol could produce it: one line for the report (else nothing)."""
    if not dataset.background or acc.pred[0] > 0 or acc.label[0] == 0:
        return []
    name = dataset.classes[0]
    if protocol.rule == "argmax":
        if bg_threshold is None:
            return [f"{name} IoU is 0 by construction: protocol {protocol.name} without bg_threshold has no "
                    f"background channel, so no pixel can be {name} (--set bg_threshold=0.5 adds TCL's)"]
        return [f"no pixel was predicted {name}: every pixel's best class scored above bg_threshold {bg_threshold}"]
    via_names = f"{name} names ({', '.join(per_class_names[0])})" if per_class_names[0] else \
        f"{name} names (the {protocol.names!r} names have none for {dataset.name})"
    return [f"{name} IoU is 0: protocol {protocol.name} predicts {name} only through {via_names} or where the best "
            f"class probability is under prob_thd {protocol.prob_thd}, and here no pixel's was (softmax over "
            f"{sum(1 for n in per_class_names if n)} classes at logit_scale {protocol.logit_scale}; --set prob_thd=P "
            f"raises the bar)"]


def _report(acc: IoUAccumulator, dataset: Dataset, settings: dict | None, source: dict, n_images: int,
            skipped: list, n_skipped: int) -> dict:
    iou = acc.iou()
    return {"miou": 100 * acc.miou(), "per_class": {c: 100 * float(v) for c, v in zip(dataset.classes, iou)},
            "dataset": dataset.name, "root": str(dataset.root), "images": n_images - n_skipped,
            "skipped": n_skipped, "skipped_files": skipped, "source": source, "protocol": settings}


class PredictionsError(ValueError):
    """Prediction files that are missing, unreadable or of the wrong size: one line per file in the message."""


def check_predictions(pred_dir: Path, dataset: Dataset) -> tuple[list[str], list[str]]:
    """Every image's prediction, checked before any scoring from the PNG headers alone: (ids without a prediction,
    one line per prediction that cannot be read or is not the size of its ground truth)."""
    missing, bad = [], []
    for item in dataset.items:
        path = pred_dir / f"{item.id}.png"
        if not path.is_file():
            missing.append(item.id)
            continue
        try:
            with Image.open(path) as im:
                size = im.size
            with Image.open(item.label) as im:
                truth = im.size
        except Exception as exn:  # PIL raises several types for broken files
            bad.append(f"{path}: cannot be read ({exn})")
            continue
        if size != truth:
            bad.append(f"{path}: prediction is {size[0]}x{size[1]} pixels, its ground truth {truth[0]}x{truth[1]}")
    return missing, bad


def score_predictions(pred_dir: str | Path, dataset: Dataset, on_error: str = "skip", progress: bool = True,
                      missing: str = "fail") -> dict:
    """mIoU of label-map PNGs that any method saved: ``pred_dir/<image id>.png``, pixel value = class index in the
    dataset's label space (after its label handling: e.g. 0..19 for V20).

    Every image of the split must have its prediction, of its ground truth's size: a missing, unreadable or
    mis-sized prediction fails the run before anything is scored (:class:`PredictionsError`, one line per file),
    because leaving an image out changes the score. With ``missing="background"`` a missing prediction is scored as
    all background (class 0 of a dataset with a background class) and the report lists those images
    (``missing_predictions``). An unreadable *ground-truth* file is handled by ``on_error`` as in :func:`evaluate`
    (skipped and counted in ``skipped``, or raised).
    """
    if missing not in ("fail", "background"):
        raise ValueError(f"missing must be 'fail' or 'background', got {missing!r}")
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"--predictions {pred_dir}: no such folder")
    absent, bad = check_predictions(pred_dir, dataset)
    if missing == "background" and absent and not dataset.background:
        raise PredictionsError(f"--missing background: {dataset.name} has no background class to score "
                               f"{len(absent)} missing prediction(s) as")
    problems = bad + ([] if missing == "background" else
                      [f"{pred_dir / (i + '.png')}: no prediction for image {i}" for i in absent])
    if problems:
        hint = " (or --missing background)" if absent and missing == "fail" and dataset.background else ""
        raise PredictionsError(f"{len(problems)} of {len(dataset.items)} predictions are missing or unusable"
                               f"{hint}:\n" + "\n".join(problems))
    absent_set = set(absent)
    acc, skipped = IoUAccumulator(len(dataset.classes)), []
    for item in tqdm(dataset.items, desc=f"{dataset.name} (predictions)", mininterval=2,
                     disable=None if progress else True):
        try:
            label = dataset.label(item)
        except (OSError, ValueError) as exn:
            if on_error == "stop":
                raise
            skipped.append({"id": item.id, "error": str(exn)})
            continue
        if item.id in absent_set:
            pred = np.zeros_like(label)  # all background
        else:
            with Image.open(pred_dir / f"{item.id}.png") as im:
                pred = np.array(im)
        acc.update(pred, label)
    report = _report(acc, dataset, None, {"kind": "predictions", "folder": str(pred_dir)}, len(dataset.items),
                     skipped, len(skipped))
    report["missing_predictions"] = sorted(absent_set)
    return report


def write_report(report: dict, out: str | Path) -> Path:
    """Writes the JSON report atomically (a temporary file renamed into place) and prints the Markdown table."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out)
    title = f"{report['dataset']}" + (f", protocol {report['protocol']['name']}" if report["protocol"] else "")
    print(markdown_table(report["per_class"], report["miou"], title))
    print(coverage(report) + f"; report: {out}")
    for note in report.get("notes", []):
        print(f"note: {note}")
    return out


def coverage(report: dict) -> str:
    """One line saying which images the mIoU is over: all of the split, or a subset and why."""
    total = report["images"] + report["skipped"]
    line = f"mIoU {report['miou']:.2f} over "
    if report["skipped"]:
        line += (f"a SUBSET: {report['images']} of {total} images ({report['skipped']} unreadable image(s) left out, "
                 f"see skipped_files)")
    else:
        line += f"all {total} images"
    if report.get("limit") and report["limit"] < report.get("split_images", 0):
        line += f" (--limit {report['limit']}: a SUBSET, the first of the split's {report['split_images']} images)"
    if report.get("missing_predictions"):
        line += f"; {len(report['missing_predictions'])} missing prediction(s) scored as all background"
    return line


# ------------------------------------------------------------------ calibration (the demo's background threshold)
def class_score_maps(predictor, dataset: Dataset, protocol: Protocol, names: str | None = None,
                     progress: bool = False) -> list[tuple[torch.Tensor, np.ndarray]]:
    """[(C x H x W class scores under rule A, class 0 left to the threshold, H x W labels)] of every image: computed
    once, so that thresholds can be swept (:func:`calibrate_threshold`)."""
    if protocol.rule != "argmax":
        raise ValueError("threshold calibration needs the argmax rule (protocol A)")
    _, owner = predictor.set_names(dataset.names(names or protocol.names),
                                   protocol.template_list(predictor.default_templates))
    out = []
    for item in tqdm(dataset.items, desc="scoring", disable=not progress, mininterval=2, leave=False):
        scores = image_name_scores(predictor, dataset.image(item), protocol)
        out.append((class_maxima(scores, owner, len(dataset.classes), float("-inf")), dataset.label(item)))
    return out


def threshold_predict(scores: torch.Tensor, threshold: float) -> np.ndarray:
    """Rule A with a constant background channel: arg-max over [threshold, class scores 1..C-1]."""
    scores = scores.clone()
    scores[0] = threshold
    return scores.max(0).indices.numpy()


def score_thresholds(scored, n_classes: int, threshold: float) -> IoUAccumulator:
    acc = IoUAccumulator(n_classes)
    for scores, label in scored:
        acc.update(threshold_predict(scores, threshold), label)
    return acc


def calibrate_threshold(scored, n_classes: int, grid=None) -> tuple[float, dict[float, float]]:
    """Background threshold that maximises mIoU on a labelled calibration split; returns (best, sweep). The mIoU is
    over the classes the split's labels hold (:meth:`IoUAccumulator.miou_present`): a calibration split drawn where
    some queried classes never occur (the demo's, of the training world) would otherwise reward a threshold or
    read-out for never naming them at all."""
    grid = grid if grid is not None else np.round(np.arange(-0.2, 0.85, 0.05), 3)
    sweep = {float(t): score_thresholds(scored, n_classes, float(t)).miou_present() for t in grid}
    return max(sweep, key=sweep.get), sweep


def chance_accumulator(dataset: Dataset, seed: int = 0) -> IoUAccumulator:
    """A predictor that labels every pixel uniformly at random among the classes."""
    rng = np.random.default_rng(seed)
    acc = IoUAccumulator(len(dataset.classes))
    for item in dataset.items:
        label = dataset.label(item)
        acc.update(rng.integers(0, len(dataset.classes), size=label.shape), label)
    return acc


def write_overlays(segmenter, dataset: Dataset, out_dir: Path, n: int) -> list[str]:
    """image | prediction | ground truth PNGs of the first ``n`` images, through ``segmenter.segment``."""
    from ..overlay import render_overlay

    names = ["background", *segmenter.index.classes]
    paths = []
    for item in dataset.items[:n]:
        result = segmenter.segment(item.image)
        truth = dataset.label(item).astype(np.int64)
        paths.append(str(render_overlay(Image.open(item.image).convert("RGB"), result.labels, names,
                                        out_dir / f"{Path(item.id).name}.png", truth=truth)))
    return paths
