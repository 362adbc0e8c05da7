"""Choosing a model's read-out and background threshold on a labelled split: ``vilseg calibrate`` and the demo.

Every candidate read-out (:data:`CANDIDATES`, or those that ``grouping``/``naming``/``blocks`` leave open) scores the
split once under protocol A's arg-max rule; a sweep of background thresholds is then applied to the stored scores
(:func:`~vilseg.eval.runner.calibrate_threshold`; mIoU over the classes the split holds), each candidate at its best
threshold. The fastest candidate within :data:`TOLERANCE` mIoU points of the best wins (:func:`prefer_fastest`), and
is saved beside the model as ``readout.json``, which ``Segmenter.from_pretrained``, ``vilseg segment``, ``web`` and
``eval`` then use. Each candidate scores against its naming's centring reference
(:func:`~vilseg.inference.segmenter.default_reference`), which the chosen read-out records.

The threshold decides background, so the split must have a background class (voc21, context60, coco_object,
synthetic); on a dataset without one there is nothing for it to decide.
"""
from __future__ import annotations

import dataclasses

from ..inference.segmenter import ReadOut, default_reference
from ..inference.strategies import GROUPINGS, NAMINGS
from .datasets import Dataset
from .predictors import SegmenterScores
from .protocols import preset
from .runner import calibrate_threshold, class_score_maps

# the read-outs calibration chooses from, fastest first (benchmarks/results/segment_cpu.json: pooled naming costs
# ~1.1-1.9x the encoder forward, masked attention over the last k blocks ~1 + k/depth, re-encoding ~20-37x)
CANDIDATES = (("clusters", "pool", None), ("clusters", "masked_attention", 1), ("clusters", "masked_attention", 2),
              ("clusters", "masked_attention", "all"), ("clusters", "reencode_global", None))
TOLERANCE = 1.0  # mIoU points: the fastest read-out within this much of the best one is chosen


def readout_key(grouping: str, naming: str, blocks=None) -> str:
    """A read-out's name in reports: ``clusters+pool``, ``clusters+masked_attention@2``."""
    return f"{grouping}+{naming}" + (f"@{blocks}" if naming == "masked_attention" else "")


def parse_readout(key: str) -> tuple[str, str, int | str | None]:
    """The inverse of :func:`readout_key`."""
    pair, _, blocks = key.partition("@")
    grouping, _, naming = pair.partition("+")
    if grouping not in GROUPINGS or naming not in NAMINGS:
        raise ValueError(f"read-out {key!r}: expected <grouping>+<naming>[@k] with a grouping of {sorted(GROUPINGS)} "
                         f"and a naming of {sorted(NAMINGS)}")
    if naming == "masked_attention":
        blocks = "all" if blocks in ("", "all") else int(blocks)
        return grouping, naming, blocks
    return grouping, naming, None


def prefer_fastest(scores: dict, tolerance: float = TOLERANCE):
    """The first (fastest) read-out of ``scores`` (ordered fastest first) whose calibration mIoU is within
    ``tolerance`` points of the best one's."""
    best = max(scores.values())
    return next(k for k, v in scores.items() if v >= best - tolerance)


def candidates_for(depth: int, grouping: str | None = None, naming: str | None = None, blocks=None) -> list[tuple]:
    """The :data:`CANDIDATES` that the given grouping, naming and blocks leave open. A masked-attention candidate whose
    k reaches as deep as an earlier one's (k = 2 and "all" on a 2-block encoder) is the same read-out and is skipped;
    a read-out outside the candidates is the only one."""
    chosen, starts = [], set()
    for g, n, k in CANDIDATES:
        if grouping not in (None, g) or naming not in (None, n) or (blocks is not None and k != blocks):
            continue
        if n == "masked_attention":
            start = 0 if k == "all" else max(0, depth - k)
            if start in starts:
                continue
            starts.add(start)
        chosen.append((g, n, k))
    if not chosen:
        n = naming or "pool"
        chosen = [(grouping or "clusters", n, (blocks or 1) if n == "masked_attention" else None)]
    return chosen


def calibrate(model, dataset: Dataset, grouping: str | None = None, naming: str | None = None, blocks=None,
              center: bool = True, limit: int | None = None, progress: bool = False,
              **readout_options) -> tuple[ReadOut, dict]:
    """Chooses ``model``'s read-out and background threshold on ``dataset`` (its first ``limit`` images).

    Returns the chosen :class:`ReadOut` (its ``calibration`` says where, on how many images, by which rule, and
    every candidate's best mIoU) and every candidate's sweep {threshold: mIoU in percent} (keys:
    :func:`readout_key`). ``center`` is the Segmenter's vocabulary centring; ``readout_options`` go to every
    candidate's :class:`ReadOut` (e.g. ``max_segments``).
    """
    from ..inference import Segmenter

    if not dataset.background:
        raise ValueError(f"calibrate: dataset {dataset.name!r} has no background class, so there is no background "
                         f"threshold to choose; calibrate on voc21, context60, coco_object or synthetic")
    if limit is not None:
        dataset = dataclasses.replace(dataset, items=dataset.items[:limit])
    protocol = preset("A", dataset.name)  # the evaluator's path: vilseg eval --protocol A
    n_classes = len(dataset.classes)
    sweeps, best = {}, {}
    for g, n, k in candidates_for(model.image_encoder.depth, grouping, naming, blocks):
        readout = ReadOut(g, n, threshold=None, **({"blocks": k} if k is not None else {}), **readout_options)
        predictor = SegmenterScores(Segmenter(model, readout=readout, center=center))
        scored = class_score_maps(predictor, dataset, protocol, progress=progress)
        threshold, sweep = calibrate_threshold(scored, n_classes)
        sweeps[readout_key(g, n, k)] = {t: 100 * v for t, v in sweep.items()}
        best[(g, n, k)] = (threshold, 100 * sweep[threshold])
    g, n, k = prefer_fastest({key: v[1] for key, v in best.items()})
    threshold, miou = best[(g, n, k)]
    options = {"reference": default_reference(n)} | readout_options  # a reference given is the one every candidate used
    readout = ReadOut(g, n, threshold=threshold, **({"blocks": k} if k is not None else {}), **options, calibration={
        "dataset": dataset.name, "split": str(dataset.root), "images": len(dataset.items), "miou": miou,
        "rule": f"fastest within {TOLERANCE} mIoU of the best", "score": "mIoU over the classes present in the split",
        "center": center,
        "candidates": {key: max(v.values()) for key, v in sweeps.items()}})
    return readout, sweeps
