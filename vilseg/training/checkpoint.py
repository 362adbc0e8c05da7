"""Crash-safe training checkpoints and exports: written to a temporary folder, then renamed into place.

A checkpoint folder ``step_N`` exists only once everything in it is written: accelerate's ``save_state`` (model with
the objectives' heads and state, optimizer, RNG), the EMA teacher (safetensors) and, last, ``trainer_state.json``
(step, skipped-sample tally, scheduler). A kill at any moment leaves either the previous complete checkpoints or a
``.tmp-step_N`` folder that the next save (or resume) clears. Nothing here unpickles code: accelerate's own files are
loaded by accelerate, the rest is safetensors and JSON.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

TRAINER_STATE = "trainer_state.json"
TEACHER_WEIGHTS = "teacher.safetensors"
TMP_PREFIX = ".tmp-"


class TrainState:
    """Step counter, skipped-sample tally and training seconds (saved as JSON beside accelerate's state; nothing is
    pickled). ``train_seconds`` is the wall-clock time of the training loop up to ``step`` summed over every session
    that trained this run, so a resumed run reports its whole cost; ``None`` where a checkpoint written before the
    field existed was resumed (unknown)."""

    def __init__(self):
        self.step = 0
        self.skipped: Counter = Counter()
        self.train_seconds: float | None = 0.0
        self.saved_step: int | None = None  # the step of the newest checkpoint this run wrote or resumed from

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped": dict(self.skipped), "train_seconds": self.train_seconds}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.skipped = Counter(state["skipped"])
        seconds = state.get("train_seconds")
        self.train_seconds = None if seconds is None else float(seconds)


def _fsync_tree(folder: Path) -> None:
    """Flushes every file of ``folder`` and the folder itself to disk (a rename must not overtake its contents)."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_folder(tmp: Path, final: Path) -> None:
    """Moves a fully written ``tmp`` folder to ``final``; an existing ``final`` is swapped out first, then removed,
    so a kill leaves either the old or the new folder under ``final`` (and at worst a stray ``.tmp-`` folder)."""
    _fsync_tree(tmp)
    old = final.with_name(TMP_PREFIX + "old-" + final.name)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Writes ``path`` through a temporary file and a rename: readers see the old or the new content, never half."""
    tmp = path.with_name(TMP_PREFIX + path.name)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoints(run_dir: Path) -> tuple[list[Path], list[Path]]:
    """(complete, incomplete) checkpoint folders of a run, oldest first. Complete = holds ``trainer_state.json``."""
    folders = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir())
    complete = [p for p in folders if (p / TRAINER_STATE).is_file()]
    return complete, [p for p in folders if p not in complete]


def latest_checkpoint(run_dir: Path, log=print) -> Path | None:
    """The newest complete checkpoint; incomplete ones (written by older versions without the rename) are skipped
    and named."""
    complete, incomplete = checkpoints(run_dir)
    for folder in incomplete:
        log(f"--resume: skipping incomplete checkpoint {folder} (no {TRAINER_STATE})")
    return complete[-1] if complete else None


def save_checkpoint(accelerator, run_dir: Path, state: TrainState, scheduler, teacher, keep: int) -> Path:
    """Writes ``run_dir/checkpoints/step_N`` atomically (see the module docstring); keeps the ``keep`` newest.

    accelerate's ``register_for_checkpointing`` would pickle the extra objects and unpickle them with
    ``weights_only=False``; safetensors and JSON keep them free of code.
    """
    from safetensors.torch import save_file

    root = run_dir / "checkpoints"
    final = root / f"step_{state.step:07d}"
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a kill during an earlier write
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if teacher is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in teacher.state_dict().items()},
                      str(tmp / TEACHER_WEIGHTS))
        payload = {**state.state_dict(), "scheduler": scheduler.state_dict()}
        (tmp / TRAINER_STATE).write_text(json.dumps(payload))  # last: its presence marks a complete checkpoint
        replace_folder(tmp, final)
        complete, _ = checkpoints(run_dir)
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    state.saved_step = state.step
    return final


def load_checkpoint(accelerator, ckpt: Path, state: TrainState, scheduler, teacher) -> None:
    from safetensors.torch import load_file

    if not (ckpt / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{ckpt / TRAINER_STATE} not found: not a complete vilseg training checkpoint")
    accelerator.load_state(str(ckpt))
    payload = json.loads((ckpt / TRAINER_STATE).read_text())
    scheduler.load_state_dict(payload.pop("scheduler"))
    state.load_state_dict(payload)
    state.saved_step = state.step
    if teacher is not None:
        teacher.load_state_dict(load_file(str(ckpt / TEACHER_WEIGHTS), device=str(accelerator.device)))
