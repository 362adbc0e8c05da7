"""A run folder belongs to one run: a second run into it is refused, ``--resume`` must bring the same settings, and
``--overwrite`` clears what an earlier run left (its stale checkpoints included) before anything new is written.

Everything here reads only, except :func:`clear_run`; the checks run before the first file of a run is written, so a
refused run leaves the folder byte for byte as it was.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from ..errors import ConfigError
from .config import flatten

# What a training run writes into run.dir (vilseg/train.py, accelerate's logging dir, the atomic export's tmp folder)
RUN_FILES = ("config.yaml", "checkpoints", "final", ".tmp-final", "train_summary.json", "init_report.json", "logs")
# A resumed run may change how far it goes, where its folder lives now and its data workers' priority (none of which
# changes what is trained), nothing else
RESUMABLE_KEYS = frozenset({"train.steps", "train.stop_at", "run.dir", "data.worker_nice"})


def run_files(run_dir: Path) -> list[str]:
    """The names in ``run_dir`` that an earlier run wrote."""
    return [name for name in RUN_FILES if (Path(run_dir) / name).exists()]


def config_differences(saved: dict, cfg: dict) -> list[str]:
    """Flat keys (``a.b``) whose values differ between two configs, RESUMABLE_KEYS aside."""
    old, new = flatten(saved), flatten(dict(cfg))
    return sorted(k for k in old.keys() | new.keys() if k not in RESUMABLE_KEYS and old.get(k) != new.get(k))


def check_run_dir(cfg: dict, run_dir: str | Path, resume: str | None = None, overwrite: bool = False) -> None:
    """Refuses, with one line naming the folder (or the keys), a run that would replace or mix with another:

    - without ``--resume`` or ``--overwrite``, a ``run_dir`` that holds an earlier run's config, checkpoints or export;
    - ``--resume`` of a run (``run_dir``'s, or the run of an explicit checkpoint folder) whose saved config differs
      from ``cfg`` in anything but RESUMABLE_KEYS.
    """
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise ConfigError("--resume continues the run in run.dir and --overwrite clears it: give one of them")
    if resume:
        source = run_dir if resume == "latest" else Path(resume).parent.parent  # RUN/checkpoints/step_N
        saved_path = source / "config.yaml"
        if not saved_path.is_file():
            return  # nothing to compare with: a run killed before it wrote its config starts over
        try:
            saved = yaml.safe_load(saved_path.read_text()) or {}
        except yaml.YAMLError as exn:
            raise ConfigError(f"--resume: {saved_path} is not readable YAML ({str(exn).splitlines()[0]})") from None
        keys = config_differences(saved, cfg)
        if keys:
            old, new = flatten(saved), flatten(dict(cfg))
            first = keys[0]
            shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
            raise ConfigError(f"--resume: {saved_path} was trained with other settings in {shown} (e.g. {first}: "
                              f"{old.get(first)!r} there, {new.get(first)!r} now); resume with its settings, or "
                              f"train a new run with run.dir=NEW_FOLDER")
        return
    held = run_files(run_dir)
    if held and not overwrite:
        raise ConfigError(f"run.dir {run_dir} already holds a run ({', '.join(held)}): continue it with --resume, or "
                          f"give a new run.dir=NEW_FOLDER (--overwrite replaces it, its checkpoints included)")


def clear_run(run_dir: str | Path) -> list[str]:
    """Removes what an earlier run wrote into ``run_dir`` (RUN_FILES; other files stay); returns the names removed."""
    run_dir = Path(run_dir)
    removed = run_files(run_dir)
    for name in removed:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return removed
