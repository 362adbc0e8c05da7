"""Backbone recipes on the synthetic world, trained and measured the same way: one command per (recipe, seed).

    python benchmarks/recipes.py --recipe scratch --seed 0      # ViL-Seg from scratch (configs/demo.yaml at 600 fp32 steps)
    python benchmarks/recipes.py --recipe mmc --seed 0          # MMC pretraining, then ViL-Seg on its encoder
    python benchmarks/recipes.py --recipe mmc_only --seed 0     # MMC alone: encoder probes only (it has no text side)
    python benchmarks/recipes.py --recipe maskco --seed 0       # MaskCo pretraining, then ViL-Seg on its encoder
    python benchmarks/recipes.py --recipe slotcon --seed 0      # SlotCon pretraining, then ViL-Seg on its encoder
    python benchmarks/recipes.py --recipe slotcon_only --seed 0 # SlotCon's slots as the grouping, named by text
    python benchmarks/recipes.py --recipe xm --seed 0           # the ablation: xm alone, xm+clu, (scratch: xm+vis+clu)
    python benchmarks/recipes.py --recipe oracle --seed 0       # the yardstick: pixel labels, same encoder and FLOPs
    python benchmarks/recipes.py --recipe demo --seed 0         # the demo as it ships (bf16, 720 steps)
    python benchmarks/recipes.py --recipe scratch --seed 0 --scale 2   # the same recipe at twice the compute
    python benchmarks/recipes.py --recipe scratch --seed 0 --readouts  # every candidate read-out (readouts.csv)
    python benchmarks/recipes.py --summarize                    # Markdown tables (means and spreads) of the CSVs,
                                                                # and every recipe as a share of the oracle
    python benchmarks/recipes.py --probe runs/x/final --split calib   # encoder probes of any model on one split

A recipe is a list of training stages (configs); stage k+1 starts from stage k's exported image encoder. The
recipes share the demo's shards, model and evaluation, and are sized to equal total training compute (FLOPs per
step measured by benchmarks/train_step.py; see docs/results.md). Each run measures:

- mIoU of seen and of held-out queries with the demo's read-out (clusters named by their re-encoded global
  embedding) and with the paper's (clusters named by pooled patch embeddings); background thresholds are calibrated
  on the calibration split;
- patch-level shape naming: on every foreground pixel, whether the best query (dense read-out) has the right shape;
- MMC's probes of the encoder's patch tokens: prompting-patch segmentation (best fixed theta, centroid prompt) and
  the overlap of intra- and inter-object similarity histograms;
- linear probes of shape and colour from each object's pooled patch tokens, and zero-shot shape naming of the same
  pooled objects in the joint space;
- training wall-clock minutes on this machine.

Rows are appended to docs/results/backbones.csv (recipes with a text side) and docs/results/probes.csv (every
recipe); with ``--scale F`` (every stage's steps times F: the compute-scaling curve) to docs/results/scaling.csv,
with the compute (``budget``, in ViL-Seg demo steps' FLOPs: 600 x F) and the optimizer steps of all stages. Every
stage runs with ``--resume``: a recipe killed part-way continues from its stage's latest checkpoint when the same
command is run again; everything else goes to OUT/<recipe>/seed<seed>/report.json with the probes' histogram PNG.
Stages are trained under OUT/stages/ and shared between recipes with the same first stages (see
:func:`train_stages`).
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from vilseg.eval.probes import probe_synthetic

RECIPES = {  # name -> training stages (configs), in order; the last stage's export is measured
    # ViL-Seg from scratch at the lab's budget: the demo's config held at 600 steps in fp32
    "scratch": ["configs/demo.yaml train.steps=600 train.mixed_precision=no"],
    "scratch_bf16": ["configs/demo.yaml train.steps=600 train.mixed_precision=bf16"],  # the same in bf16 autocast
    "demo": ["configs/demo.yaml"],  # the demo as it ships: bf16, 720 steps (1.2x the budget, in the same wall time)
    "scratch+dense": ["configs/dense/vilseg-demo.yaml"],  # ViL-Seg with region distillation, one stage
    "scratch+pacl": ["configs/dense/vilseg-pacl-demo.yaml"],  # ViL-Seg with PACL's patch-aligned contrast
    "mmc": ["configs/mmc/pretrain-demo.yaml", "configs/mmc/vilseg-demo.yaml"],
    "mmc+dense": ["configs/mmc/pretrain-demo.yaml", "configs/dense/mmc-vilseg-demo.yaml"],
    "mmc_only": ["configs/mmc/pretrain-demo.yaml"],
    "maskco": ["configs/maskco/pretrain-demo.yaml", "configs/maskco/vilseg-demo.yaml"],
    "slotcon": ["configs/slotcon/pretrain-demo.yaml", "configs/slotcon/vilseg-demo.yaml"],
    "slotcon_only": ["configs/slotcon/slots-demo.yaml"],  # SlotCon's slots, named through a caption-trained projection
    # what each of ViL-Seg's parts buys at equal compute; the demo (xm + vis + clu) is `scratch`
    "xm": ["configs/ablation/xm-demo.yaml"],  # the cross-modal contrast alone: segments from the `merge` grouping
    "xm+clu": ["configs/ablation/xm-clu-demo.yaml"],  # ... and the clustering head, without the vision contrast
}
ORACLES = {"oracle": "factorised", "oracle16": "joint"}  # supervised yardsticks (benchmarks/oracle.py): pixel labels
BUDGET = 600  # every recipe at --scale 1 costs what 600 ViL-Seg demo steps cost (FLOPs, docs/results.md)
HELDOUT_PARTS = ["miou_heldout_combo", "miou_heldout_combo_pool", "miou_synonym", "miou_synonym_pool",
                 "synonym_ceiling"]  # held-out in its two parts (issue #30); empty in rows measured before them
# how a row was measured: MEASURED today; rows of models that were not kept say what they lack (LEGACY)
MEASURED = "reference-centred scores, each naming's own reference, calibrated on the classes present"
# (vilseg.inference.segmenter.default_reference; eval.runner.calibrate_threshold. Rows measured before calibration
# scored the classes present say "reference-centred scores, each naming's own reference")
LEGACY = "list-centred scores, no held-out parts (before ce088a4; model not kept)"
SUPERVISED = "supervised oracle (no text side)"
# (rows measured before, with every naming centred on the captions' mean, say "the captions' reference for every
# naming" in their measured_with column)
SCALING_COLUMNS = ["recipe", "seed", "budget", "steps", "miou_seen", "miou_heldout", "miou_seen_pool",
                   "miou_heldout_pool", "patch_shape_acc", "cpu_minutes", *HELDOUT_PARTS, "measured_with",
                   "calibrated_readout"]
BACKBONE_COLUMNS = ["recipe", "seed", "miou_seen", "miou_heldout", "miou_seen_pool", "miou_heldout_pool",
                    "patch_shape_acc", "prompt_patch_miou", "intra_inter_overlap", "cpu_minutes", *HELDOUT_PARTS,
                    "measured_with", "calibrated_readout"]
READOUT_COLUMNS = ["recipe", "seed", "readout", "calib_miou", "threshold", "miou_seen", "miou_heldout",
                   "miou_heldout_combo", "miou_synonym", "synonym_ceiling", "measured_with"]
# settings that change how a run is kept or scheduled, not what it trains: a stage trained under other values is reused
HOUSEKEEPING = ("run.dir", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every", "data.worker_nice")
PROBE_COLUMNS = ["recipe", "seed", "probe_shape_acc", "probe_colour_acc", "zeroshot_object_shape_acc",
                 "prompt_patch_miou", "prompt_patch_miou_random", "intra_inter_overlap", "intra_inter_auc",
                 "cpu_minutes"]


def split_stage(spec: str) -> tuple[str, list[str]]:
    """A stage of :data:`RECIPES`: a config, optionally followed by its own ``key=value`` overrides
    (``"configs/demo.yaml train.mixed_precision=bf16"``)."""
    config, *overrides = spec.split()
    return config, overrides


def stage_name(spec: str) -> str:
    """A stage's name: its config's path under configs/, without the suffix ("mmc-pretrain-demo"), so that two
    methods' configs of the same file name are never taken for one stage; a stage's own overrides follow in
    braces ("demo{train.mixed_precision=bf16}")."""
    config, overrides = split_stage(spec)
    parts = Path(config).with_suffix("").parts
    name = "-".join(parts[parts.index("configs") + 1:] if "configs" in parts else parts[-1:])
    return name + ("{" + ",".join(overrides) + "}" if overrides else "")


def stage_steps(spec: str, scale: float) -> int:
    """A stage's optimizer steps at ``scale`` times its config's compute (its own overrides applied)."""
    from vilseg.training.config import load_config

    return max(1, round(load_config(*split_stage(spec)).train.steps * scale))


def train_stages(recipe: str, seed: int, pattern: str, root: Path, overrides: list[str],
                 scale: float = 1.0) -> tuple[Path, float | None]:
    """Trains every stage of ``recipe``; returns (the last export, training wall-clock minutes of all its stages, None
    where a stage's is unknown).

    A stage's folder is named by the chain of configs that leads to it and the seed
    (``root/stages/<stage>+<stage>/seed<seed>``, :func:`stage_name`), so recipes that share a prefix share its
    training: ``mmc_only`` measures the very encoder that ``mmc`` continues from. A finished stage (its export and
    ``minutes.json`` exist) is reused, not trained again; an unfinished one resumes from its latest checkpoint, whose
    training seconds over earlier sessions count in ``minutes.json``. At ``scale`` != 1 every stage
    takes ``scale`` times its steps (schedules stretched with it), and its folder name says so (``demo@x2``).
    """
    import fcntl

    from vilseg.train import main as train_main

    previous, minutes, chain = None, 0.0, []
    for spec in RECIPES[recipe]:
        chain.append(stage_name(spec) + (f"@x{scale:g}" if scale != 1 else ""))
        run_dir = root / "stages" / "+".join(chain) / f"seed{seed}"
        done = run_dir / "minutes.json"
        config, own = split_stage(spec)
        args = ["--config", config, *own, f"run.dir={run_dir}", f"data.shards={pattern}", f"run.seed={seed}",
                f"train.steps={stage_steps(spec, scale)}", *overrides]
        if previous is not None:
            args.append(f"model.init_from={previous}")
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / ".stage.lock", "w") as lock:  # two recipes that share this stage: one trains it
            fcntl.flock(lock, fcntl.LOCK_EX)
            check_stage_config(run_dir, config, args[2:])
            if done.is_file() and (run_dir / "final" / "model.safetensors").is_file():
                print(f"reusing {run_dir} (trained earlier)")
            else:
                args.append("--resume")  # last: it takes an optional folder
                train_main(args)
                summary = json.loads((run_dir / "train_summary.json").read_text())
                done.write_text(json.dumps({"minutes": stage_minutes(summary)}))
        previous = run_dir / "final"
        spent = json.loads(done.read_text())["minutes"]
        minutes = None if minutes is None or spent is None else minutes + spent
    return previous, minutes


def stage_minutes(summary: dict) -> float | None:
    """A stage's training minutes from its ``train_summary.json``: every session's, counted in the checkpoints; for a
    run resumed from a checkpoint older than that count, the whole stage at this session's pace, or None (unknown)
    where this session trained too few steps to have a pace."""
    if summary.get("train_seconds_total") is not None:
        return summary["train_seconds_total"] / 60
    if summary["steps_this_session"] == summary["steps"]:
        return summary["seconds"] / 60
    pace = summary["seconds_per_step_after_warmup"]
    return pace * summary["steps"] / 60 if pace else None


def check_stage_config(run_dir: Path, config: str, overrides: list[str]) -> None:
    """Refuses to reuse or resume a stage folder that an earlier run trained with another config (a config file
    edited since, or other overrides): its results would be reported under the new settings.

    Raises:
        ValueError: naming the folder and the keys that differ.
    """
    import yaml

    from vilseg.training.config import flatten, load_config, validate_training_config

    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    old = flatten(yaml.safe_load(saved.read_text()))
    new = flatten(validate_training_config(load_config(config, overrides)))
    # keys the schema gained after that run are left out: their defaults keep the behaviour it had; where the folder
    # is (run.dir), how often it checkpointed or logged, and its workers' priority do not change what was trained
    keys = sorted(k for k in old if str(old[k]) != str(new.get(k)) and k not in HOUSEKEEPING)
    if keys:
        shown = "; ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys[:6])
        raise ValueError(f"{run_dir} was trained with another config ({shown}); delete it or pass another --out")


def has_text(recipe: str) -> bool:
    from vilseg.training.config import load_config

    return "xm" in load_config(*split_stage(RECIPES[recipe][-1])).objectives


def measure(model_dir: Path, data_dir: Path, out: Path, text: bool) -> dict:
    """Every measurement of one trained model (see the module docstring)."""
    from vilseg import demo
    from vilseg.eval import load_dataset, patch_naming_accuracy
    from vilseg.models import ViLSeg

    items = load_dataset("synthetic", data_dir / "eval")
    names = items.classes[1:]
    model = ViLSeg.from_pretrained(model_dir)
    report = probe_synthetic(model, data_dir / "eval", out / "intra_inter.png")
    if text:
        from vilseg.inference import ReadOut, Segmenter

        grouping = grouping_of(model, model_dir)
        for naming in ("reencode_global", "pool"):
            report[f"cluster+{naming}"] = demo.evaluate_model(model_dir, data_dir, out / naming, 4, grouping, naming)
        report["grouping"] = grouping
        dense = Segmenter(model, vocabulary=names, readout=ReadOut("dense", "pool", threshold=None))
        report["patch_naming"] = patch_naming_accuracy(dense, items, names)
        report["zeroshot_object_shape"] = zero_shot_object_shape(model, items, names)
    return report


def measure_readouts(model_dir: Path, data_dir: Path, out: Path) -> list[dict]:
    """Every candidate read-out of the demo's calibration (``demo.CANDIDATES``: pooled, masked attention at each k,
    re-encoded), each with its own threshold calibrated on the calibration split, then scored on the evaluation
    split: one row per read-out (``READOUT_COLUMNS`` without recipe and seed)."""
    from vilseg import demo
    from vilseg.models import ViLSeg

    depth, seen, rows_ = ViLSeg.from_pretrained(model_dir).image_encoder.depth, set(), []
    for grouping, naming, blocks in demo.CANDIDATES:
        if naming == "masked_attention":
            start = 0 if blocks == "all" else max(0, depth - blocks)
            if start in seen:  # the same read-out as a smaller k on this depth
                continue
            seen.add(start)
        key = demo.readout_key(grouping, naming, blocks)
        report = demo.evaluate_model(model_dir, data_dir, out / "readouts" / key, 0, grouping, naming, blocks=blocks)
        rows_.append({"readout": key, "calib_miou": report["calibration"]["miou"], "threshold": report["bg_threshold"],
                      "miou_seen": report["seen_miou"], "miou_heldout": report["heldout_pooled_miou"],
                      "miou_heldout_combo": report["heldout_combo_miou"], "miou_synonym": report["synonym_miou"],
                      "synonym_ceiling": report["synonym_ceiling"], "measured_with": MEASURED})
        print(json.dumps(rows_[-1]), flush=True)
    return rows_


def grouping_of(model, model_dir: Path) -> str:
    """The grouping a recipe's model is read out with: the clustering head's segments where its last stage trained
    the head; otherwise SlotCon's prototypes (``slotcon_only``) or, with neither, the training-free ``merge``
    grouping (``xm``: an untrained head's arg-max would be a random partition of the patch embeddings)."""
    if _trains_clusters(model_dir):
        return "clusters"
    return "slots" if model.slot_head is not None and model.config.n_prototypes else "merge"


def _trains_clusters(model_dir: Path) -> bool:
    """Whether the stage that exported ``model_dir`` trained the clustering head (its config names ``clu``)."""
    import yaml

    config = Path(model_dir).parent / "config.yaml"
    return config.is_file() and "clu" in (yaml.safe_load(config.read_text()).get("objectives") or {})


def zero_shot_object_shape(model, items, names: list[str]) -> float:
    """Shape accuracy (%) of naming each object by the best query for its pooled joint-space patch embeddings."""
    import torch

    from vilseg.eval import EncoderFeatures, object_features
    from vilseg.inference import VocabularyIndex
    from vilseg.inference.segmenter import default_reference

    x, y, _ = object_features(EncoderFeatures(model, joint=True), items)
    scores = VocabularyIndex.build(model, names, reference=default_reference("pool")).scores(torch.from_numpy(x))
    pred = scores.argmax(1).numpy()
    return float(100 * np.mean([names[p].split()[1] == names[c - 1].split()[1] for p, c in zip(pred, y)]))


def rows(recipe: str, seed: int, report: dict, minutes: float) -> tuple[dict | None, dict]:
    """The report as a backbones.csv row (None without a text side) and a probes.csv row."""
    probe = {"recipe": recipe, "seed": seed, "probe_shape_acc": report["linear_probe"]["shape"],
             "probe_colour_acc": report["linear_probe"]["colour"],
             "zeroshot_object_shape_acc": report.get("zeroshot_object_shape", float("nan")),
             "prompt_patch_miou": report["prompt_patch"]["centroid"]["best_miou"],
             "prompt_patch_miou_random": report["prompt_patch"]["random"]["best_miou"],
             "intra_inter_overlap": report["intra_inter"]["overlap"], "intra_inter_auc": report["intra_inter"]["auc"],
             "cpu_minutes": minutes}
    if "cluster+pool" not in report:
        return None, probe
    demo_r, pool_r = report["cluster+reencode_global"], report["cluster+pool"]
    backbone = {"recipe": recipe, "seed": seed, "miou_seen": demo_r["seen_miou"],
                "miou_heldout": demo_r["heldout_pooled_miou"], "miou_seen_pool": pool_r["seen_miou"],
                "miou_heldout_pool": pool_r["heldout_pooled_miou"], "patch_shape_acc": report["patch_naming"]["shape"],
                "prompt_patch_miou": probe["prompt_patch_miou"], "intra_inter_overlap": probe["intra_inter_overlap"],
                "cpu_minutes": minutes,
                "miou_heldout_combo": demo_r["heldout_combo_miou"], "miou_heldout_combo_pool": pool_r["heldout_combo_miou"],
                "miou_synonym": demo_r["synonym_miou"], "miou_synonym_pool": pool_r["synonym_miou"],
                "synonym_ceiling": demo_r["synonym_ceiling"], "measured_with": MEASURED,
                "calibrated_readout": calibrated_readout(report)}
    return backbone, probe


def calibrated_readout(report: dict) -> str:
    """The read-out the model's calibration would keep of the two measured ("pool" or "reencode_global"): the faster
    (pooling) unless re-encoding is more than the tolerance better on the calibration split (eval.calibrate's rule)."""
    from vilseg.eval.calibrate import prefer_fastest

    return prefer_fastest({"pool": report["cluster+pool"]["calibration"]["miou"],
                           "reencode_global": report["cluster+reencode_global"]["calibration"]["miou"]})


def oracle_row(recipe: str, seed: int, report: dict) -> dict:
    """benchmarks/oracle.py's report as a backbones.csv / scaling.csv row: seen and held-out combinations only (an
    oracle has no text side, so neither synonyms nor a pooled held-out number; the pooled-read-out columns do not
    apply either)."""
    e = report["eval"]
    return {"recipe": recipe, "seed": seed, "miou_seen": e["seen_miou"], "miou_heldout_combo": e["heldout_combo_miou"],
            "cpu_minutes": report["cpu_minutes"], "steps": report["steps"], "measured_with": SUPERVISED}


def append_row(path: Path, columns: list[str], row: dict, key: tuple[str, ...] = ("recipe", "seed")) -> None:
    """Appends ``row`` to a CSV (header written if new); an earlier row with the same ``key`` columns is replaced.
    Runs side by side may finish together: the read-modify-write holds a lock on ``<csv>.lock``."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _append_row(path, columns, row, key)


def _sortable(value: str) -> tuple:
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def _append_row(path: Path, columns: list[str], row: dict, key: tuple[str, ...]) -> None:
    kept = []
    if path.is_file():
        with path.open() as f:
            reader = csv.DictReader(f)
            kept = [r for r in reader if tuple(r[k] for k in key) != tuple(str(row[k]) for k in key)]
            # a column the file has and this writer does not know (a newer harness added it) is kept, not dropped
            columns = [*columns, *(c for c in reader.fieldnames or [] if c not in columns)]
    kept.append({k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in row.items()})
    order = list(dict.fromkeys([*RECIPES, *(r["recipe"] for r in kept)]))
    kept.sort(key=lambda r: (order.index(r["recipe"]), *(_sortable(r[k]) for k in key[1:])))
    tmp = path.with_name(path.name + ".tmp")  # written whole, then renamed: a failure leaves the old file intact
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(kept)
    tmp.replace(path)


def mean_spread(values, digits: int = 1, bold: bool = False) -> str:
    """``mean (min-max)`` of the values (``mean`` alone for one value), the mean in bold if asked."""
    values = np.asarray(values, dtype=float)
    mean, low, high = (f"{v:.{digits}f}" for v in (values.mean(), values.min(), values.max()))
    if len(values) == 1:
        return mean
    return f"{'**' + mean + '**' if bold else mean} ({low}-{high})"


def summarize(path: Path) -> str:
    """Markdown table: per recipe (and read-out, in readouts.csv), the mean and the spread (min-max) over seeds of
    every numeric column, and how often each value occurs in a column of words."""
    with path.open() as f:
        table = list(csv.DictReader(f))
    keys = [k for k in ("recipe", "readout", "measured_with") if k in table[0]]
    columns = [c for c in table[0] if c not in (*keys, "seed")]
    lines = [f"| {' | '.join(keys)} | seeds | " + " | ".join(columns) + " |", "|---" * (len(columns) + len(keys) + 1) + "|"]
    for group_key in dict.fromkeys(tuple(r[k] for k in keys) for r in table):
        group = [r for r in table if tuple(r[k] for k in keys) == group_key]
        cells = []
        for c in columns:
            given = [r[c] for r in group if r[c] not in ("", None)]
            if any(_sortable(v)[0] for v in given):  # a column of words (calibrated_readout): how often each
                cells.append(", ".join(f"{v} {given.count(v)}" for v in dict.fromkeys(given)))
                continue
            values = np.array([float(r[c]) if r[c] not in ("", None) else np.nan for r in group])
            if np.isnan(values).all():
                cells.append("-")
                continue
            digits = 2 if np.nanmax(np.abs(values)) < 2 else 1  # AUCs and the like
            cells.append(mean_spread(values[~np.isnan(values)], digits, bold=True))
        lines.append(f"| {' | '.join(group_key)} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def yardstick(path: Path, oracle: str = "oracle", budget: int | None = None) -> str:
    """Markdown table: every recipe measured today (``measured_with`` = MEASURED), its seen and held-out-combination
    mIoU (means over seeds) and each as a share of the supervised oracle's, with its synonyms against their
    ceiling; the oracles' own rows first. Recipes whose rows predate the held-out parts are left out. Each seed is
    read out as its calibration would (``calibrated_readout``: pooled or re-encoded), and the table says how often
    each was kept. With ``budget`` (scaling.csv), only the rows of that budget, against the oracle at that budget."""
    with path.open() as f:
        table = [calibrated_columns(r) for r in csv.DictReader(f)
                 if budget is None or int(float(r["budget"])) == budget]
    mean = lambda rows, c: float(np.mean([float(r[c]) for r in rows if r.get(c) not in ("", None)]))  # noqa: E731
    ref = [r for r in table if r["recipe"] == oracle]
    if not ref:
        return f"(no {oracle} rows in {path})"
    seen_ref, combo_ref = mean(ref, "miou_seen"), mean(ref, "miou_heldout_combo")
    lines = ["| recipe | seeds | read-out (pooled/re-encoded) | seen | held-out combinations | synonyms (ceiling %) | "
             "seen, % of oracle | combinations, % of oracle | combinations / seen |", "|---" * 9 + "|"]
    for recipe in dict.fromkeys(r["recipe"] for r in table):
        rows_ = [r for r in table if r["recipe"] == recipe and r.get("measured_with") in (MEASURED, SUPERVISED)]
        if not rows_:
            continue
        seen, combo = mean(rows_, "miou_seen"), mean(rows_, "miou_heldout_combo")
        spread = lambda c: mean_spread([float(r[c]) for r in rows_ if r.get(c) not in ("", None)])  # noqa: E731
        synonyms = (f"{spread('miou_synonym')} ({mean(rows_, 'synonym_ceiling'):.0f})"
                    if any(r.get("miou_synonym") for r in rows_) else "-")
        kept = [r.get("calibrated_readout") for r in rows_]
        readouts = f"{kept.count('pool')}/{kept.count('reencode_global')}" if any(kept) else "-"
        lines.append(f"| {recipe} | {len(rows_)} | {readouts} | {spread('miou_seen')} | {spread('miou_heldout_combo')} | {synonyms} | "
                     f"{100 * seen / seen_ref:.0f}% | {100 * combo / combo_ref:.0f}% | {100 * combo / seen:.0f}% |")
    return "\n".join(lines)


def calibrated_columns(row: dict) -> dict:
    """A backbones.csv row with its seen, combination and synonym columns taken from the read-out its calibration
    keeps (the ``_pool`` columns where that is pooling)."""
    if row.get("calibrated_readout") != "pool":
        return row
    return row | {c: row[f"{c}_pool"] for c in ("miou_seen", "miou_heldout_combo", "miou_synonym")}


def plot_scaling(path: Path, out: Path) -> Path:
    """scaling.csv -> a PNG: held-out and seen mIoU against training steps, per recipe, under both read-outs
    (re-encoded segments: solid; pooled patch embeddings: dashed); one marker per seed, the line through the means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with path.open() as f:
        table = list(csv.DictReader(f))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (split, title) in zip(axes, (("heldout", "held-out queries"), ("seen", "seen queries"))):
        for i, recipe in enumerate(dict.fromkeys(r["recipe"] for r in table)):
            rows = [r for r in table if r["recipe"] == recipe]
            steps = sorted({int(r["budget"]) for r in rows})
            for column, style, readout in ((f"miou_{split}", "-", "re-encoded"),
                                           (f"miou_{split}_pool", "--", "pooled")):
                means = [np.mean([float(r[column]) for r in rows if int(r["budget"]) == s]) for s in steps]
                ax.plot(steps, means, style, color=colours[i % len(colours)], label=f"{recipe}, {readout}")
                ax.scatter([int(r["budget"]) for r in rows], [float(r[column]) for r in rows], s=12,
                           color=colours[i % len(colours)])
        ax.set_xscale("log", base=2)
        ticks = sorted({int(r["budget"]) for r in table})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("training compute (ViL-Seg demo steps' FLOPs)")
        ax.set_ylabel("mIoU")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=[*RECIPES, *ORACLES])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--out", type=Path, default=Path("runs/recipes"))
    parser.add_argument("--results", type=Path, default=Path("docs/results"), help="folder of the CSVs")
    parser.add_argument("--train-samples", type=int, default=30000)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="every stage's steps times this (the compute-scaling curve; rows go to scaling.csv)")
    parser.add_argument("--scaling-row", action="store_true",
                        help="at --scale 1, write the row to scaling.csv as well as backbones.csv (the curve's first point)")
    parser.add_argument("--skip-train", action="store_true", help="measure OUT/<recipe>/seed<seed>'s last export")
    parser.add_argument("--readouts", action="store_true",
                        help="measure every candidate read-out of the recipe's model instead (rows to readouts.csv)")
    parser.add_argument("--summarize", action="store_true", help="print the Markdown tables of the CSVs")
    parser.add_argument("--plot-scaling", action="store_true", help="draw RESULTS/scaling.png from scaling.csv")
    parser.add_argument("--probe", type=Path, help="print the encoder probes of this model (no training)")
    parser.add_argument("--split", default="eval", help="with --probe: the split of --data to probe on")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every stage")
    args = parser.parse_args(argv)
    if args.plot_scaling:
        print(plot_scaling(args.results / "scaling.csv", args.results / "scaling.png"))
        return {}
    if args.summarize:
        tables = {name: summarize(args.results / f"{name}.csv") for name in ("backbones", "probes", "readouts")
                  if (args.results / f"{name}.csv").is_file()}
        for name, table in tables.items():
            print(f"\n{name}.csv\n{table}")
        if (args.results / "backbones.csv").is_file():
            tables["yardstick"] = yardstick(args.results / "backbones.csv")
            print(f"\nagainst the supervised oracle (backbones.csv)\n{tables['yardstick']}")
        if (args.results / "scaling.csv").is_file():
            tables["yardstick_x4"] = yardstick(args.results / "scaling.csv", budget=4 * BUDGET)
            print(f"\nat 4x, against the oracle at 4x (scaling.csv, budget {4 * BUDGET})\n{tables['yardstick_x4']}")
        return tables
    if args.probe:
        from vilseg.models import ViLSeg

        short = lambda r: {"prompt_patch_miou": r["prompt_patch"]["centroid"]["best_miou"],  # noqa: E731
                           "prompt_patch_miou_random": r["prompt_patch"]["random"]["best_miou"],
                           "intra_inter_overlap": r["intra_inter"]["overlap"], "intra_inter_auc": r["intra_inter"]["auc"],
                           "probe_shape_acc": r["linear_probe"]["shape"], "probe_colour_acc": r["linear_probe"]["colour"]}
        report = probe_synthetic(ViLSeg.from_pretrained(args.probe), args.data / args.split)
        print(json.dumps({"model": str(args.probe), "split": args.split, **short(report)}))
        return report
    if args.recipe is None:
        parser.error("--recipe is required (or --summarize)")
    from vilseg.demo import prepare_data

    pattern = prepare_data(args.data, args.train_samples, 300, image_size=64)
    if args.recipe in ORACLES:
        import oracle

        folder = args.out / args.recipe / (f"seed{args.seed}" + (f"@x{args.scale:g}" if args.scale != 1 else ""))
        report = oracle.train(ORACLES[args.recipe], args.seed, args.scale, args.data, folder)
        row = oracle_row(args.recipe, args.seed, report)
        if args.scale != 1 or args.scaling_row:
            append_row(args.results / "scaling.csv", SCALING_COLUMNS,
                       {c: row.get(c, "") for c in SCALING_COLUMNS} | {"budget": round(BUDGET * args.scale)},
                       key=("recipe", "seed", "budget"))
        if args.scale == 1:
            append_row(args.results / "backbones.csv", BACKBONE_COLUMNS, {c: row.get(c, "") for c in BACKBONE_COLUMNS})
        print(json.dumps(row))
        return report
    out = args.out / args.recipe / (f"seed{args.seed}" + (f"@x{args.scale:g}" if args.scale != 1 else ""))
    out.mkdir(parents=True, exist_ok=True)
    if args.skip_train:
        report_path = out / "report.json"
        previous = json.loads(report_path.read_text())
        model_dir, minutes = Path(previous["model"]), previous["cpu_minutes"]
    else:
        model_dir, minutes = train_stages(args.recipe, args.seed, pattern, args.out, args.overrides, args.scale)
    if args.readouts:
        found = measure_readouts(model_dir, args.data, out)
        for row in found:
            append_row(args.results / "readouts.csv", READOUT_COLUMNS,
                       {"recipe": args.recipe + (f"@x{args.scale:g}" if args.scale != 1 else ""), "seed": args.seed,
                        **row}, key=("recipe", "seed", "readout"))
        return {"readouts": found}
    report = measure(model_dir, args.data, out, has_text(args.recipe))
    import platform

    import torch

    report.update({"recipe": args.recipe, "seed": args.seed, "model": str(model_dir), "cpu_minutes": minutes,
                   "stages": RECIPES[args.recipe], "overrides": args.overrides, "scale": args.scale,
                   "torch_threads": torch.get_num_threads(),
                   "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores"})
    (out / "report.json").write_text(json.dumps(report, indent=1))
    backbone, probe = rows(args.recipe, args.seed, report, minutes)
    if args.scale != 1 or args.scaling_row:
        steps = sum(stage_steps(c, args.scale) for c in RECIPES[args.recipe])
        row = {"budget": round(BUDGET * args.scale), "steps": steps,
               **{k: v for k, v in (backbone or {}).items() if k in SCALING_COLUMNS}}
        append_row(args.results / "scaling.csv", SCALING_COLUMNS,
                   {c: row.get(c, probe.get(c)) for c in SCALING_COLUMNS}, key=("recipe", "seed", "budget"))
        print(json.dumps(row, indent=1))
        if args.scale != 1:
            return report
    if backbone is not None:
        append_row(args.results / "backbones.csv", BACKBONE_COLUMNS, backbone)
    append_row(args.results / "probes.csv", PROBE_COLUMNS, probe)
    print(json.dumps({"backbones": backbone, "probes": probe}, indent=1))
    return report


if __name__ == "__main__":
    main()
