"""Layered YAML configs: ``configs/default.yaml`` <- experiment delta <- ``key=value`` command-line overrides.

Every key of a delta or override must already exist in the default file (misspellings fail loudly, naming the key
and the file); sub-dicts listed in ``FREE_FORM`` are passed on as they are and validated by their consumer (model
overrides by the model factory, objectives by their options dataclasses). In an experiment file a free-form
sub-dict replaces the default's (an experiment lists its objectives completely); command-line overrides merge into
it (``objectives.clu.weight=0.2``).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from ..errors import ConfigError, ConfigFileError, ConfigKeyError, ConfigTypeError

FREE_FORM = {"model.overrides", "objectives"}
DEFAULT_NAME = "default.yaml"


class Config(dict):
    """A dict with attribute access (``cfg.train.steps``); nested dicts become Configs."""

    def __getattr__(self, name: str) -> Any:
        try:
            value = self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None
        return Config(value) if isinstance(value, dict) and not isinstance(value, Config) else value


def _deep_merge(base: dict, delta: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in delta.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _merge(base: dict, delta: dict, source: str, prefix: str = "", replace_free: bool = True) -> dict:
    out = copy.deepcopy(base)
    for key, value in delta.items():
        path = f"{prefix}{key}"
        if path in FREE_FORM:
            value = value if value is not None else {}
            if not isinstance(value, dict):
                raise ConfigTypeError(f"config key {path!r} in {source} must be a mapping, got {value!r}")
            out[key] = value if replace_free else _deep_merge(base.get(key) or {}, value)
            continue
        if key not in base:
            valid = ", ".join(sorted(map(str, base)))
            raise ConfigKeyError(f"unknown config key {path!r} in {source}; valid keys here: {valid}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigTypeError(f"config key {path!r} in {source} must be a mapping, got {value!r}")
            out[key] = _merge(base[key], value, source, f"{path}.", replace_free)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigFileError(f"config file {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigTypeError(f"config file {str(path)!r} must hold a mapping at top level")
    return data


def parse_override(text: str) -> dict:
    """``"train.steps=10"`` -> ``{"train": {"steps": 10}}`` (values parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def find_default(path: str | Path | None) -> Path:
    """The ``default.yaml`` an experiment file layers on: the nearest one in its folder or a parent folder
    (``configs/mmc/x.yaml`` -> ``configs/default.yaml``), else the repository's ``configs/default.yaml``."""
    if path is not None:
        for folder in Path(path).resolve().parents:
            if (folder / DEFAULT_NAME).is_file():
                return folder / DEFAULT_NAME
    return Path(__file__).resolve().parents[2] / "configs" / DEFAULT_NAME


def load_config(path: str | Path | None, overrides: list[str] = (), default: str | Path | None = None) -> Config:
    """Resolves the layered config.

    Args:
        path: experiment file (layered on :func:`find_default`'s ``default.yaml`` unless ``default`` is given);
            None for the default alone.
        overrides: ``key=value`` strings, applied last.
        default: explicit default file.
    """
    if default is None:
        default = find_default(path)
    cfg = _read_yaml(Path(default))
    if path is not None and Path(path).resolve() != Path(default).resolve():
        cfg = _merge(cfg, _read_yaml(Path(path)), str(path))
    for text in overrides:
        cfg = _merge(cfg, parse_override(text), f"command-line override {text!r}", replace_free=False)
    return Config(cfg)


def save_config(cfg: dict, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(dict(cfg), sort_keys=False))


def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """Flat ``a.b`` -> scalar view (for TensorBoard hparams)."""
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


# ------------------------------------------------------------------ the training config's schema
# Types and ranges of every training key, checked after layering (pydantic, lax mode: "1e-3" is read as a number).
# Defaults live in configs/default.yaml, not here: the schema only says what a value must be. Free-form sub-dicts
# (model.overrides, objectives) are validated by their consumers (the model factory, the objectives' options).

from typing import Annotated, Literal  # noqa: E402

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator  # noqa: E402

Fraction = Field(ge=0.0, le=1.0)
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunSection(_Section):
    dir: str
    seed: int = Field(ge=0)


class ModelSection(_Section):
    name: str
    overrides: dict[str, Any]
    init_from: str | None
    freeze: list[str]


class TeacherSection(_Section):
    momentum: float = Fraction
    final_momentum: float = Fraction


class MaskingSection(_Section):
    ratio: tuple[float, float]
    min_block: int = Field(ge=1)
    fill: Literal["image", "noise"]


class AugmentSection(_Section):
    photometric: bool
    caption_view: bool
    jitter: tuple[Annotated[float, Field(ge=0)], Annotated[float, Field(ge=0)], Annotated[float, Field(ge=0)],
                  Annotated[float, Field(ge=0, le=0.5)]]
    jitter_p: float = Fraction
    grayscale_p: float = Fraction
    blur_p: tuple[Probability, Probability, Probability]
    solarize_p: tuple[Probability, Probability, Probability]
    blur_sigma: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]]


class DataSection(_Section):
    shards: str | list[str] | None
    resampled: bool
    batch_size: int = Field(ge=1)
    num_workers: int = Field(ge=0)
    worker_nice: int | None = Field(ge=0, le=19)
    shuffle_buffer: int = Field(ge=1)
    n_global: int = Field(ge=1)
    n_local: int = Field(ge=0)
    global_size: int | None = Field(ge=1)
    local_size: int | None = Field(ge=1)
    global_scale: tuple[float, float]
    local_scale: tuple[float, float]
    flip_p: float = Fraction
    min_image_side: int = Field(ge=1)
    max_caption_chars: int = Field(ge=1)
    hard_negative_groups: list[list[str]]
    hard_negative_exclude: list[str]
    augment: AugmentSection
    masking: MaskingSection


class OptimSection(_Section):
    lr: float = Field(gt=0)
    image_lr: float | None = Field(gt=0)
    text_lr: float | None = Field(gt=0)
    layer_decay: float | None = Field(gt=0, le=1)
    weight_decay: float = Field(ge=0)
    betas: tuple[float, float]
    warmup_steps: int = Field(ge=0)
    min_lr_ratio: float = Fraction
    grad_clip: float | None = Field(ge=0)


class TrainSection(_Section):
    steps: int = Field(ge=1)
    grad_accum: int = Field(ge=1)
    mixed_precision: Literal["no", "bf16", "fp16"]
    log_every: int = Field(ge=1)
    checkpoint_every: int = Field(ge=1)
    keep_checkpoints: int = Field(ge=1)
    max_minutes: float | None = Field(gt=0)
    text_cache_size: int = Field(ge=1)
    text_subspace: float | None = Field(gt=0, le=1)
    text_subspace_captions: int = Field(ge=2)
    stop_at: int | None = Field(ge=1)

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _no_is_a_word(cls, value):
        """YAML reads an unquoted ``no`` (``train.mixed_precision=no``) as false: it means "no"."""
        return "no" if value is False else value


class TrainingConfig(_Section):
    run: RunSection
    model: ModelSection
    objectives: dict[str, dict[str, Any] | None]
    teacher: TeacherSection
    data: DataSection
    optim: OptimSection
    train: TrainSection


def validate_training_config(cfg: dict) -> Config:
    """Checks every key's type and range; returns the config with values converted ("1e-3" -> 0.001).

    Raises:
        ValueError: one line per bad value, naming the key, the value and what was expected.
    """
    try:
        checked = TrainingConfig.model_validate(dict(cfg))
    except ValidationError as exn:
        found: dict[str, list[str]] = {}
        for err in exn.errors():
            key, value = [], dict(cfg)
            for part in err["loc"]:  # follow the location as far as the config goes (unions add type names)
                if isinstance(value, dict) and part in value:
                    value = value[part]
                elif isinstance(value, (list, tuple)) and isinstance(part, int) and part < len(value):
                    value = value[part]
                else:
                    break
                key.append(str(part))
            if err["type"] == "missing" and not isinstance(err["loc"][-1], int):
                head = f"config {'.'.join(str(p) for p in err['loc'])} is missing"
                found.setdefault(head, [])
                continue
            message = f"expected {err['loc'][-1] + 1} values" if err["type"] == "missing" else err["msg"]
            found.setdefault(f"config {'.'.join(key)}={value!r}", []).append(message)
        lines = [head + (": " + " or ".join(dict.fromkeys(m)) if m else "") for head, m in found.items()]
        raise ConfigError("\n".join(lines)) from None
    return Config(checked.model_dump(mode="json"))
