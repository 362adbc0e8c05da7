"""Train ViL-Seg on a webdataset image-caption stream.

    accelerate launch vilseg/train.py --config configs/demo.yaml [key=value ...] [--resume [DIR]]

Precision and distribution are decided by accelerate (``accelerate config`` / ``accelerate launch`` flags and
``train.mixed_precision``); the same code runs in one CPU process and under multi-process DDP.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `accelerate launch vilseg/train.py` puts vilseg/ first on sys.path: drop it
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import math
import shutil
import time
from collections import Counter

import torch
from torch import nn

from vilseg.config import flatten, load_config, save_config
from vilseg.models import create_model
from vilseg.objectives import EMATeacher, ViLSegObjective, ema_momentum


class TrainState:
    """Step counter and skipped-sample tally (saved as JSON beside accelerate's state; nothing is pickled)."""

    def __init__(self):
        self.step = 0
        self.skipped: Counter = Counter()

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.skipped = Counter(state["skipped"])


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="experiment YAML (delta over configs/default.yaml)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue from run.dir's latest checkpoint, or from the given checkpoint directory")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    return parser.parse_args(argv)


def build_model(cfg):
    model = create_model(cfg.model.name, **dict(cfg.model.overrides or {}))
    if cfg.model.init_from:
        from vilseg.models import ViLSeg

        source = ViLSeg.from_pretrained(cfg.model.init_from)
        model.load_state_dict(source.state_dict())
    return model


def build_objective(cfg) -> ViLSegObjective:
    return ViLSegObjective(dict(cfg.loss.weights), vis_temperature=cfg.loss.vis_temperature,
                           iic_lambda=cfg.loss.iic_lambda, align_size=cfg.loss.align_size,
                           clu_detach=cfg.loss.clu_detach)


def build_optimizer(model: nn.Module, cfg):
    """AdamW; no weight decay on biases, norms, tokens, position embeddings and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "token" in name or "pos_embed" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))


def build_scheduler(optimizer, cfg):
    """Linear warm-up then cosine decay to ``lr * min_lr_ratio``; stepped once per optimizer step."""
    warmup, total, floor = cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_loader(cfg, model):
    from torch.utils.data import DataLoader

    from vilseg.data.multicrop import MultiCrop
    from vilseg.data.stream import make_train_stream

    image_cfg = model.config.image
    global_size = cfg.data.global_size or image_cfg.img_size
    local_size = cfg.data.local_size or global_size // 2
    crop = MultiCrop(global_size, local_size, cfg.data.n_global, cfg.data.n_local, cfg.data.global_scale,
                     cfg.data.local_scale, cfg.data.flip_p, image_cfg.mean, image_cfg.std, dict(cfg.data.ssl_colour))
    if cfg.data.shards is None:
        raise ValueError("data.shards is not set: give a shard pattern, e.g. data.shards='data/train-{000..009}.tar'")
    stream = make_train_stream(cfg.data.shards, model.tokenizer, crop, cfg.data.batch_size, seed=cfg.run.seed,
                               resampled=cfg.data.resampled, shuffle_buffer=cfg.data.shuffle_buffer,
                               swap_groups=cfg.loss.hard_negative_groups, swap_exclude=cfg.loss.hard_negative_exclude)
    return DataLoader(stream, batch_size=None, num_workers=cfg.data.num_workers,
                      persistent_workers=cfg.data.num_workers > 0)


def to_device(batch: dict, device) -> dict:
    out = dict(batch)
    out["views"] = [v.to(device, non_blocking=True) for v in batch["views"]]
    for key in ("boxes", "flips", "input_ids", "attention_mask", "neg_input_ids", "neg_attention_mask", "has_neg"):
        if key in batch:
            out[key] = batch[key].to(device, non_blocking=True)
    return out


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    return ckpts[-1] if ckpts else None


def training_step(model, teacher, objective, batch, n_global: int) -> dict:
    """One forward pass: model embeddings, teacher embeddings of the global views, and the loss terms.

    Hard-negative captions, when present, are encoded in the same text-tower call as the positives.
    """
    ids, mask = batch.get("input_ids"), batch.get("attention_mask")
    if "neg_input_ids" in batch:
        ids = torch.cat([ids, batch["neg_input_ids"]])
        mask = torch.cat([mask, batch["neg_attention_mask"]])
    out = model(batch["views"], ids, mask, vision=objective.needs_teacher, n_cluster_views=objective.n_cluster_views,
                detach_cluster_input=objective.clu_detach)
    teacher_embed = teacher(batch["views"][:n_global]) if teacher is not None else None
    return objective(out, teacher_embed, batch["boxes"], batch["flips"], batch.get("has_neg"))


TRAINER_STATE = "trainer_state.json"
TEACHER_WEIGHTS = "teacher.safetensors"


def save_checkpoint(accelerator, run_dir: Path, state: TrainState, scheduler, teacher, keep: int) -> None:
    """accelerate ``save_state`` (model, optimizer, RNG) + the teacher as safetensors + step/scheduler as JSON.

    accelerate's ``register_for_checkpointing`` would pickle the extra objects and unpickle them with
    ``weights_only=False``; safetensors and JSON keep them free of code.
    """
    from safetensors.torch import save_file

    ckpt = run_dir / "checkpoints" / f"step_{state.step:07d}"
    accelerator.save_state(str(ckpt))
    if accelerator.is_main_process:
        if teacher is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in teacher.state_dict().items()},
                      str(ckpt / TEACHER_WEIGHTS))
        payload = {**state.state_dict(), "scheduler": scheduler.state_dict()}
        (ckpt / TRAINER_STATE).write_text(json.dumps(payload))
        for old in sorted((run_dir / "checkpoints").glob("step_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, ckpt: Path, state: TrainState, scheduler, teacher) -> None:
    from safetensors.torch import load_file

    if not (ckpt / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{ckpt / TRAINER_STATE} not found: not a vilseg training checkpoint")
    accelerator.load_state(str(ckpt))
    payload = json.loads((ckpt / TRAINER_STATE).read_text())
    scheduler.load_state_dict(payload.pop("scheduler"))
    state.load_state_dict(payload)
    if teacher is not None:
        teacher.load_state_dict(load_file(str(ckpt / TEACHER_WEIGHTS), device=str(accelerator.device)))


def make_accelerator(cfg, run_dir: Path):
    """The one place where precision and distribution are decided (with accelerate's launcher and config)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    # Without an accelerator, ask for CPU explicitly: under a multi-process launch accelerate then forms a gloo
    # group (MULTI_CPU) instead of leaving every process on its own.
    no_accelerator = not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
                          or torch.backends.mps.is_available())
    return Accelerator(
        cpu=no_accelerator, gradient_accumulation_steps=cfg.train.grad_accum,
        mixed_precision=cfg.train.mixed_precision, log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")))


def export(accelerator, model, run_dir: Path, state: TrainState, summary: dict, cfg=None) -> Path:
    """Writes the final model (safetensors + config) and train_summary.json; returns the model directory.

    With ``train.text_subspace`` the exported model first gets its training-caption text subspace
    (:meth:`~vilseg.ViLSeg.fit_text_subspace`, fitted on the first ``train.text_subspace_captions`` captions of
    ``data.shards``).
    """
    from accelerate.utils import gather_object

    skipped = Counter()
    for counts in gather_object([dict(state.skipped)]):  # every process's tally
        skipped.update(counts)
    final_dir = run_dir / "final"
    if accelerator.is_main_process:
        if cfg is not None and cfg.train.text_subspace:
            from .data.stream import read_captions

            k = model.fit_text_subspace(read_captions(cfg.data.shards, cfg.train.text_subspace_captions),
                                        variance=cfg.train.text_subspace)
            summary = {**summary, "text_subspace_dim": k}
        model.save_pretrained(final_dir)
        summary = {"steps": state.step, **summary, "processes": accelerator.num_processes,
                   "distributed_type": str(accelerator.distributed_type), "skipped_samples": dict(skipped),
                   "final_model": str(final_dir)}
        (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(json.dumps(summary))
    accelerator.wait_for_everyone()
    return final_dir


def main(argv: list[str] | None = None) -> Path:
    """Runs training; returns the directory of the exported final model."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(cfg.run.dir)
    accelerator = make_accelerator(cfg, run_dir)
    set_seed(cfg.run.seed)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    model = build_model(cfg)
    objective = build_objective(cfg)
    teacher = EMATeacher(model.image_encoder, model.vision_head) if objective.needs_teacher else None
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    loader = build_loader(cfg, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()
    if teacher is not None:
        teacher.to(accelerator.device)
    if args.resume:
        ckpt = latest_checkpoint(run_dir) if args.resume == "latest" else Path(args.resume)
        if ckpt is None or not ckpt.is_dir():
            raise FileNotFoundError(f"--resume: no checkpoint found ({args.resume!r} under {run_dir / 'checkpoints'})")
        load_checkpoint(accelerator, ckpt, state, scheduler, teacher)
        accelerator.print(f"resumed from {ckpt} at step {state.step}")
    accelerator.init_trackers("vilseg", config=flatten(cfg))
    unwrapped = accelerator.unwrap_model(model)

    batches = iter(loader)
    for _ in range(state.step * cfg.train.grad_accum):  # exact resumption: replay the deterministic stream
        next(batches)
    progress = tqdm(total=cfg.train.steps, initial=state.step, desc="train", disable=not accelerator.is_main_process)
    start, start_step, images_seen = time.time(), state.step, 0
    while state.step < cfg.train.steps:
        batch = to_device(next(batches), accelerator.device)
        state.skipped.update(batch["skipped"])
        with accelerator.accumulate(model):
            terms = training_step(model, teacher, objective, batch, cfg.data.n_global)
            accelerator.backward(terms["loss"])
            if accelerator.sync_gradients and cfg.optim.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        images_seen += batch["views"][0].shape[0]
        if not accelerator.sync_gradients:
            continue
        scheduler.step()
        state.step += 1
        if teacher is not None:
            momentum = ema_momentum(state.step, cfg.train.steps, cfg.train.ema_momentum)
            teacher.update(unwrapped.image_encoder, unwrapped.vision_head, momentum)
        progress.update(1)
        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps:
            logs = {f"loss/{k}": float(v.detach()) for k, v in terms.items()}
            logs.update({"lr": scheduler.get_last_lr()[0], "skipped": sum(state.skipped.values())})
            accelerator.log(logs, step=state.step)
            progress.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in logs.items() if k.startswith("loss")})
        if state.step % cfg.train.checkpoint_every == 0 and state.step < cfg.train.steps:
            save_checkpoint(accelerator, run_dir, state, scheduler, teacher, cfg.train.keep_checkpoints)
        if cfg.train.stop_at is not None and state.step >= cfg.train.stop_at:
            accelerator.print(f"train.stop_at={cfg.train.stop_at}: stopping; continue with --resume")
            break
        if cfg.train.max_minutes and time.time() - start > 60 * cfg.train.max_minutes:
            accelerator.print(f"train.max_minutes={cfg.train.max_minutes} reached at step {state.step}: stopping")
            break
    progress.close()
    elapsed = time.time() - start
    save_checkpoint(accelerator, run_dir, state, scheduler, teacher, cfg.train.keep_checkpoints)
    final_dir = export(accelerator, unwrapped, run_dir, state, {
        "steps_this_session": state.step - start_step, "seconds": round(elapsed, 1),
        "images_per_second_per_process": round(images_seen / max(elapsed, 1e-9), 2)}, cfg)
    accelerator.end_training()
    return final_dir


def cli() -> None:
    main()


if __name__ == "__main__":
    main()
