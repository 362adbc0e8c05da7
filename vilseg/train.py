"""Run one training stage: the objectives named in the config, on an image-caption or image-only stream.

    accelerate launch vilseg/train.py --config configs/demo.yaml [key=value ...] [--resume [DIR]]
    accelerate launch vilseg/train.py --config configs/mmc/pretrain-demo.yaml           # stage 1: MMC, images only
    accelerate launch vilseg/train.py --config configs/mmc/vilseg-demo.yaml             # stage 2: ViL-Seg on it

A stage is its config: which objectives with which weights and options (``objectives``), the data, the schedule,
and where the image encoder starts (``model.init_from``: another stage's export, a timm checkpoint, or scratch).
Precision and distribution are decided by accelerate (``accelerate config`` / ``accelerate launch`` flags and
``train.mixed_precision``); the same code runs in one CPU process and under multi-process DDP.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `accelerate launch vilseg/train.py` puts vilseg/ first on sys.path: drop it
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import copy
import json
import os
import math
import time
from collections import Counter

import torch
from torch import nn

from vilseg.training.checkpoint import (TrainState, latest_checkpoint, load_checkpoint, replace_folder, save_checkpoint,
                               write_text_atomic)
from vilseg.training.config import flatten, load_config, save_config, validate_training_config
from vilseg.training.rundir import check_run_dir, clear_run
from vilseg.models import create_model
from vilseg.objectives import EMATeacher, Learner, build_objectives, ema_momentum
from vilseg.training.stage import freeze_parts, freeze_unused, init_image_encoder, layer_id
from vilseg.errors import ConfigError, ConfigFileError, OneLineParser


def parse_args(argv):
    parser = OneLineParser(prog="vilseg train", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="experiment YAML (delta over configs/default.yaml)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue from run.dir's latest checkpoint, or from the given checkpoint directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in run.dir (its config, checkpoints and export) instead of "
                             "refusing to start")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    return parser.parse_args(argv)


def check_config(config: str | None, overrides: list[str]):
    """The validated training config, with everything that can be checked before a model exists: every key's type
    and range, the objectives and their options, and the shards (local files exist). Raises ConfigError, naming the
    key or file; ``vilseg train`` runs this before it starts accelerate."""
    from vilseg.data.stream import resolve_shards
    from vilseg.objectives import REGISTRY, check_objectives

    cfg = validate_training_config(load_config(config, overrides))
    objectives = check_objectives(dict(cfg.objectives))
    captions = any("captions" in REGISTRY[name].needs for name in objectives)
    resolve_shards(cfg.data.shards, captions)
    return cfg


def build_model(cfg) -> tuple[nn.Module, dict | None]:
    """The stage's model, its image encoder initialised from ``model.init_from`` if set; returns (model, report)."""
    from vilseg.training.stage import init_report

    model = create_model(cfg.model.name, **dict(cfg.model.overrides or {}))
    clip = getattr(model, "init_report", None)  # a model started from a CLIP: both towers came from it
    report = init_report(model, clip["source"], clip["kind"], clip["loaded"]) if clip else None
    if cfg.model.init_from:
        encoder = init_image_encoder(model, cfg.model.init_from)
        if report is not None:  # the CLIP's, with the image encoder then replaced by another stage's
            encoder = init_report(model, f"{report['source']}, then {encoder['source']}",
                                  f"{report['kind']}; image encoder: {encoder['kind']}",
                                  sorted(set(report["loaded"]) | set(encoder["loaded"])))
        report = encoder
    return model, report


def build_learner(cfg, model) -> tuple[Learner, EMATeacher | None, list[str]]:
    """The objectives on ``model`` as one :class:`~vilseg.objectives.Learner`, the shared EMA teacher if any
    objective needs one, and the model parameters frozen because no objective trains them."""
    from vilseg.training.text_cache import TextFeatureCache

    objectives, weights = build_objectives(dict(cfg.objectives), model)
    parts = set().union(*(o.model_parts() for o in objectives.values()))
    frozen = sorted(set(freeze_unused(model, parts)) | set(freeze_parts(model, list(cfg.model.freeze))))
    needs = frozenset().union(*(o.needs for o in objectives.values()))
    cache = None
    if "captions" in needs and not any(p.requires_grad for p in model.text_encoder.parameters()):
        cache = TextFeatureCache(model.text_encoder, model.tokenizer, cfg.train.text_cache_size)
    learner = Learner(model, objectives, weights, n_global=cfg.data.n_global,
                      corruption_fill=cfg.data.masking.fill, text_cache=cache)
    teacher = EMATeacher(model.image_encoder, learner.teacher_heads()) if "teacher" in needs else None
    return learner, teacher, frozen


def check_text_features(cfg, model=None) -> str | None:
    """The frozen text tower's identity when the stream may read stored text features (objectives that read
    captions, a frozen tower, shards on disk), else None. Raises ConfigError when the first shard holds features of
    another tower or negatives of other word groups (:func:`vilseg.data.text_features.check_shard_features`).

    Without ``model`` (``vilseg train``, before it launches) the model is built only if the first shard holds
    features, to compare towers."""
    from vilseg.data.stream import resolve_shards
    from vilseg.data.text_features import check_shard_features, first_meta
    from vilseg.models.text_encoder import tower_identity
    from vilseg.objectives import REGISTRY, check_objectives

    if not any("captions" in REGISTRY[name].needs for name in check_objectives(dict(cfg.objectives))):
        return None
    folder, synthetic, urls = resolve_shards(cfg.data.shards, captions=True)
    if folder or synthetic:
        return None
    meta = first_meta(urls)
    if model is None:
        if meta is None:
            return None
        model = build_model(cfg)[0]
    if any(p.requires_grad for p in model.text_encoder.parameters()):  # a tower that trains: features go stale
        return None
    identity = tower_identity(model)
    if meta is not None:
        check_shard_features(meta, urls[0], identity, cfg.model.name, cfg.data.hard_negative_groups,
                             cfg.data.hard_negative_exclude)
    return identity


def build_optimizer(module: nn.Module, cfg):
    """AdamW over the trainable parameters; no weight decay on biases, norms, tokens, position embeddings, the
    logit scale and prototypes. Learning rates: ``optim.image_lr`` for the image encoder and its projection,
    ``optim.text_lr`` for the text tower, ``optim.lr`` for the rest (heads, objectives), with ``optim.layer_decay``
    scaling the image encoder's by layer (:func:`~vilseg.training.stage.layer_id`). One parameter group per (rate,
    decay): the scheduler scales each group's own rate."""
    o = cfg.optim
    inner = getattr(module, "model", module)
    depth = len(inner.image_encoder.vit.blocks) if hasattr(inner, "image_encoder") else 0
    groups: dict[tuple[float, float], list] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        part = name[len("model."):] if name.startswith("model.") else name
        lr = o.lr
        if part.startswith(("image_encoder.", "image_proj.")):
            lr = o.image_lr or o.lr
            if o.layer_decay:
                lr *= o.layer_decay ** (depth + 1 - layer_id(part, depth))
        elif part.startswith("text_encoder."):
            lr = o.text_lr or o.lr
        no_decay = p.ndim < 2 or "token" in name or "pos_embed" in name
        groups.setdefault((lr, 0.0 if no_decay else o.weight_decay), []).append(p)
    params = [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in sorted(groups.items())]
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas))


def build_scheduler(optimizer, cfg):
    """Linear warm-up then cosine decay to ``lr * min_lr_ratio``; stepped once per optimizer step."""
    warmup, total, floor = cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _lower_priority(nice: int, worker_id: int) -> None:
    """A DataLoader worker's ``worker_init_fn``: raise its niceness by ``nice``."""
    os.nice(nice)


def worker_niceness(cfg, on_cpu: bool) -> int:
    """``data.worker_nice``, or with null: +19 when the step runs on the CPU, 0 beside an accelerator.

    On a CPU that the step's threads already fill, a worker at the same priority preempts one of them, and the
    other then waits for it at the end of every parallel region; at +19 the worker runs in the threads' idle gaps
    and, should it fall behind, whenever the step waits for its batch. The demo's loop went from 1.16x to 1.04x
    the bare step on 2 cores (docs/results.md section 4). Beside an accelerator the CPU feeds the device, and the
    workers keep their priority."""
    if cfg.data.worker_nice is not None:
        return cfg.data.worker_nice
    return 19 if on_cpu else 0


def build_loader(cfg, model, needs: frozenset[str], text_tower: str | None = None, on_cpu: bool = True):
    """The stream of batches, with only what the objectives need: captions (and hard negatives), local views,
    masks for corruption; ``text_tower`` (a frozen tower's identity) lets it read the shards' stored text
    features. ``on_cpu``: the step runs on the CPU (the workers' priority: :func:`worker_niceness`)."""
    import functools

    from torch.utils.data import DataLoader

    from vilseg.data.augment import Photometric
    from vilseg.data.masking import BlockMasking
    from vilseg.data.multicrop import MultiCrop
    from vilseg.data.stream import make_train_stream

    image_cfg = model.config.image
    global_size = cfg.data.global_size or image_cfg.img_size
    local_size = cfg.data.local_size or global_size // 2
    n_local = cfg.data.n_local if "local_views" in needs else 0
    captions = "captions" in needs
    aug = cfg.data.augment
    photometric = Photometric(tuple(aug.jitter), aug.jitter_p, aug.grayscale_p, tuple(aug.blur_p),
                              tuple(aug.solarize_p), tuple(aug.blur_sigma)) if aug.photometric else None
    crop = MultiCrop(global_size, local_size, cfg.data.n_global, n_local, cfg.data.global_scale,
                     cfg.data.local_scale, cfg.data.flip_p, image_cfg.mean, image_cfg.std, photometric,
                     intact_first=captions and not aug.caption_view)
    masking = None
    if "corrupted" in needs:
        grid = global_size // image_cfg.patch_size
        masking = BlockMasking((grid, grid), tuple(cfg.data.masking.ratio), cfg.data.masking.min_block)
    stream = make_train_stream(cfg.data.shards, crop, cfg.data.batch_size, seed=cfg.run.seed,
                               resampled=cfg.data.resampled, shuffle_buffer=cfg.data.shuffle_buffer,
                               captions=captions, swap_groups=cfg.data.hard_negative_groups if captions else None,
                               swap_exclude=cfg.data.hard_negative_exclude, masking=masking,
                               min_image_side=cfg.data.min_image_side, max_caption_chars=cfg.data.max_caption_chars,
                               text_tower=text_tower)
    nice = worker_niceness(cfg, on_cpu)
    return DataLoader(stream, batch_size=None, num_workers=cfg.data.num_workers,
                      persistent_workers=cfg.data.num_workers > 0,
                      worker_init_fn=functools.partial(_lower_priority, nice) if nice else None)


def to_device(batch: dict, device) -> dict:
    out = dict(batch)
    out["views"] = [v.to(device, non_blocking=True) for v in batch["views"]]
    for key in ("boxes", "flips", "masks", "has_neg", "text_features", "text_features_ok", "neg_text_features",
                "neg_text_features_ok"):
        if key in batch:
            out[key] = batch[key].to(device, non_blocking=True)
    return out


def make_accelerator(cfg, run_dir: Path):
    """The one place where precision and distribution are decided (with accelerate's launcher and config)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    # accelerate keeps one state per process and refuses another precision in it: a second run in this process (the
    # next stage of a recipe, a test) may use another precision. The process group (PartialState) is kept. accelerate
    # has no public call for this; _reset_state is what its own tests use.
    AcceleratorState._reset_state(reset_partial_state=False)
    # Without an accelerator, ask for CPU explicitly: under a multi-process launch accelerate then forms a gloo
    # group (MULTI_CPU) instead of leaving every process on its own.
    no_accelerator = not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
                          or torch.backends.mps.is_available())
    return Accelerator(
        cpu=no_accelerator, gradient_accumulation_steps=cfg.train.grad_accum,
        mixed_precision=cfg.train.mixed_precision, log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")))


TRAINING_FILE = "training.json"  # beside an export's weights: what it was trained on


def training_record(cfg, state: TrainState) -> dict:
    """What an export was trained on (its ``training.json``): the data, the objectives, the steps, the stage it
    started from, and whether the data is vilseg's synthetic world of coloured shapes (then ``vilseg segment`` and
    the web demo say so: such a model names nothing else). The synthetic world is recognised by ``synthetic:N`` or
    by the ``world`` entry of the shards' ``manifest.json`` (written by ``python -m data_prep.synthetic``)."""
    shards = cfg.data.shards
    synthetic = isinstance(shards, str) and shards.startswith("synthetic:")
    if isinstance(shards, str) and not synthetic:
        manifest = Path(shards.split("::")[0]).parent / "manifest.json"
        try:
            synthetic = "world" in json.loads(manifest.read_text())
        except (OSError, ValueError):
            pass
    return {"data": {"shards": shards, "synthetic_world": bool(synthetic)}, "objectives": sorted(cfg.objectives),
            "steps": state.step, "init_from": cfg.model.init_from, "model": cfg.model.name}


def export(accelerator, model, run_dir: Path, state: TrainState, summary: dict, cfg, captions: bool) -> Path:
    """Writes the final model (safetensors + config) and train_summary.json; returns the model directory.

    With ``train.text_subspace`` (and a stage that trains on captions) the exported copy of the model has the
    training captions' text subspace folded into its text projection (:meth:`~vilseg.ViLSeg.fold_text_subspace`,
    fitted on the first ``train.text_subspace_captions`` captions of ``data.shards``); the live model is unchanged.
    A stage that trains on captions also stores the same captions' mean embedding as the model's text reference
    (:meth:`~vilseg.ViLSeg.fit_text_reference`), which vocabulary centring subtracts.
    """
    from accelerate.utils import gather_object

    skipped = Counter()
    for counts in gather_object([dict(state.skipped)]):  # every process's tally
        skipped.update(counts)
    final_dir = run_dir / "final"
    if accelerator.is_main_process:
        tmp_dir = run_dir / ".tmp-final"
        if captions:
            from vilseg.data.stream import read_captions

            model = copy.deepcopy(model)
            texts = read_captions(cfg.data.shards, cfg.train.text_subspace_captions)
            if cfg.train.text_subspace:
                k = model.fold_text_subspace(texts, variance=cfg.train.text_subspace)
                summary = {**summary, "text_subspace_dim": k}
            model.fit_text_reference(texts)  # after the fold: the reference lives in the exported joint space
            summary = {**summary, "text_reference_captions": len(texts)}
        model.save_pretrained(tmp_dir)
        write_text_atomic(tmp_dir / TRAINING_FILE, json.dumps(training_record(cfg, state), indent=1))
        replace_folder(tmp_dir, final_dir)
        summary = {"steps": state.step, **summary, "processes": accelerator.num_processes,
                   "distributed_type": str(accelerator.distributed_type), "skipped_samples": dict(skipped),
                   "final_model": str(final_dir)}
        write_text_atomic(run_dir / "train_summary.json", json.dumps(summary, indent=2))
        accelerator.print(json.dumps(summary))
    accelerator.wait_for_everyone()
    return final_dir


def cfg_init_from(report: dict) -> bool:
    """Whether an init report is of ``model.init_from`` (another stage's export or a checkpoint), not of a CLIP."""
    return not report["source"].startswith("open_clip ") or ", then " in report["source"]


def log_init(accelerator, run_dir: Path, report: dict | None, frozen: list[str], resuming: bool = False) -> None:
    """Says where the image encoder came from (which tensors loaded, which are new) and what no objective trains;
    writes the full lists to run_dir/init_report.json. A resumed run's weights come from its checkpoint: nothing is
    said about initialisation then."""
    if not accelerator.is_main_process:
        return
    if resuming:
        pass
    elif report is None:
        accelerator.print("model: every tensor initialised from scratch (model.init_from is null)")
    else:
        origin = "model.init_from" if cfg_init_from(report) else "model"
        accelerator.print(f"{origin}: {report['source']} ({report['kind']}): loaded {len(report['loaded'])} "
                          f"tensors: {', '.join(report['loaded_summary'])}; new {len(report['new'])} tensors: "
                          f"{', '.join(report['new_summary'])}")
    if frozen:
        accelerator.print(f"frozen (model.freeze, or no objective trains them): {len(frozen)} tensors under "
                          f"{sorted({n.split('.')[0] for n in frozen})}")
    (run_dir / "init_report.json").write_text(json.dumps({"init": report, "frozen": frozen}, indent=1))


def main(argv: list[str] | None = None) -> Path:
    """Runs training; returns the directory of the exported final model."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    args = parse_args(argv)
    cfg = check_config(args.config, args.overrides)
    run_dir = Path(cfg.run.dir)
    check_run_dir(cfg, run_dir, args.resume, args.overwrite)  # before anything is written
    accelerator = make_accelerator(cfg, run_dir)
    if args.overwrite and accelerator.is_main_process:
        removed = clear_run(run_dir)
        if removed:
            accelerator.print(f"--overwrite: removed {', '.join(removed)} from {run_dir}")
    accelerator.wait_for_everyone()
    set_seed(cfg.run.seed)
    model, init_report = build_model(cfg)
    if getattr(model, "joint", "learned") == "clip" and cfg.train.text_subspace:
        raise ConfigError("train.text_subspace folds the captions' subspace into a learned text projection; a model "
                          "started from a CLIP keeps CLIP's text space: set train.text_subspace: null")
    learner, teacher, frozen = build_learner(cfg, model)
    text_tower = check_text_features(cfg, model) if learner.text_cache is not None else None  # nothing written yet
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    log_init(accelerator, run_dir, init_report, frozen, resuming=bool(args.resume))
    optimizer = build_optimizer(learner, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    loader = build_loader(cfg, model, learner.needs, text_tower, on_cpu=accelerator.device.type == "cpu")
    learner, optimizer = accelerator.prepare(learner, optimizer)
    state = TrainState()
    if teacher is not None:
        teacher.to(accelerator.device)
    if args.resume:
        ckpt = latest_checkpoint(run_dir, accelerator.print) if args.resume == "latest" else Path(args.resume)
        if ckpt is None:  # killed before its first checkpoint was complete: a requeued job starts over
            accelerator.print(f"--resume: no complete checkpoint under {run_dir / 'checkpoints'}; starting at step 0")
        elif not ckpt.is_dir():
            raise ConfigFileError(f"--resume {args.resume}: no such checkpoint folder")
        else:
            load_checkpoint(accelerator, ckpt, state, scheduler, teacher)
            accelerator.print(f"resumed from {ckpt} at step {state.step}")
    accelerator.init_trackers("vilseg", config=flatten(cfg))
    inner = accelerator.unwrap_model(learner)
    heads = inner.teacher_heads()

    batches = iter_epochs(loader, accelerator.print)
    if state.step < cfg.train.steps:
        for _ in range(state.step * cfg.train.grad_accum):  # exact resumption: replay the deterministic stream
            next(batches)
    progress = tqdm(total=cfg.train.steps, initial=state.step, desc="train", disable=not accelerator.is_main_process)
    start, start_step, images_seen = time.time(), state.step, 0
    earlier_seconds = state.train_seconds  # the sessions before this one (None: unknown)

    def clock() -> None:  # the run's training seconds so far, kept in every checkpoint
        if earlier_seconds is not None:
            state.train_seconds = earlier_seconds + time.time() - start
    steady = (start_step + min(10, (cfg.train.steps - start_step) // 2), None)  # (step, time) after the warm-up
    while state.step < cfg.train.steps:
        batch = to_device(next(batches), accelerator.device)
        state.skipped.update(batch["skipped"])
        with accelerator.accumulate(learner):
            terms = learner(batch, teacher, state.step, cfg.train.steps)
            accelerator.backward(terms["loss"])
            if accelerator.sync_gradients and cfg.optim.grad_clip:
                accelerator.clip_grad_norm_(learner.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        images_seen += batch["views"][0].shape[0]
        if not accelerator.sync_gradients:
            continue
        inner.after_step()
        scheduler.step()
        state.step += 1
        momentum = None
        if teacher is not None:
            momentum = ema_momentum(state.step, cfg.train.steps, cfg.teacher.momentum, cfg.teacher.final_momentum)
            teacher.update(inner.model.image_encoder, heads, momentum)
        progress.update(1)
        if state.step == steady[0]:
            steady = (state.step, time.time())
        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps:
            log_step(accelerator, progress, state, terms, scheduler, inner, momentum, cfg.train.steps)
        if state.step % cfg.train.checkpoint_every == 0 and state.step < cfg.train.steps:
            clock()
            save_checkpoint(accelerator, run_dir, state, scheduler, teacher, cfg.train.keep_checkpoints)
        if cfg.train.stop_at is not None and state.step >= cfg.train.stop_at:
            accelerator.print(f"train.stop_at={cfg.train.stop_at}: stopping; continue with --resume")
            break
        if cfg.train.max_minutes and time.time() - start > 60 * cfg.train.max_minutes:
            accelerator.print(f"train.max_minutes={cfg.train.max_minutes} reached at step {state.step}: stopping")
            break
    progress.close()
    end = time.time()
    elapsed = end - start
    if state.saved_step != state.step:  # a stop on a checkpoint step has saved this step already
        clock()
        save_checkpoint(accelerator, run_dir, state, scheduler, teacher, cfg.train.keep_checkpoints)
    summary = {"steps_this_session": state.step - start_step, "seconds": round(elapsed, 1),
               "train_seconds_total": None if state.train_seconds is None else round(state.train_seconds, 1),
               "images_per_second_per_process": round(images_seen / max(elapsed, 1e-9), 2),
               "seconds_per_step_after_warmup": (round((end - steady[1]) / (state.step - steady[0]), 4)
                                                 if steady[1] is not None and state.step > steady[0] else None),
               "objectives": dict(inner.weights)}
    if inner.text_cache is not None:
        cache = inner.text_cache
        summary["text_cache"] = {"hit_rate": round(cache.hit_rate, 4), "captions": len(cache.store),
                                 "encode_seconds": round(cache.encode_seconds, 1)}
        # where each caption's (and hard negative's) features came from, this session
        summary["text_features"] = {"shards": inner.stored_features, "cache": cache.hits, "tower": cache.misses}
    final_dir = export(accelerator, inner.model, run_dir, state, summary, cfg, "captions" in inner.needs)
    accelerator.end_training()
    return final_dir


def iter_epochs(loader, log=print):
    """The loader's batches without end: a one-pass stream (``data.resampled: false``) starts its next epoch when it
    ends (webdataset reshuffles each epoch). Raises if an epoch yields no batch at all."""
    epoch = 0
    while True:
        count = 0
        for batch in loader:
            count += 1
            yield batch
        if count == 0:
            raise ValueError("data.shards yielded no complete batch in a whole pass: fewer readable samples per "
                             "process than data.batch_size?")
        epoch += 1
        log(f"data: pass {epoch} over data.shards ended after {count} batches; starting pass {epoch + 1}")


def log_step(accelerator, progress, state: TrainState, terms: dict, scheduler, learner: Learner, momentum, total):
    logs = {f"loss/{k}": float(v.detach()) for k, v in terms.items()}
    logs.update({"lr": scheduler.get_last_lr()[0], "skipped": sum(state.skipped.values())})
    logs.update(learner.log_values(state.step, total))
    if momentum is not None:
        logs["teacher_momentum"] = momentum
    if learner.text_cache is not None:
        logs["text_cache_hit_rate"] = learner.text_cache.hit_rate
    accelerator.log(logs, step=state.step)
    progress.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in logs.items() if k.startswith("loss")})


def cli(argv: list[str] | None = None) -> None:
    """The command-line entry (``python -m vilseg.train``, ``accelerate launch vilseg/train.py``, ``vilseg train``): a
    configuration or input error is reported as one line per problem on stderr (by the first process only) with exit
    status 2, before training starts; any other failure keeps its traceback."""
    try:
        main(argv)
    except ConfigError as exn:
        if int(os.environ.get("RANK", "0")) == 0:
            for line in str(exn).splitlines():
                print(f"vilseg train: {line.strip()}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()
