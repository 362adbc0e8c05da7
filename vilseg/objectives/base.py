"""The objective contract, the registry from config names to objectives, and option validation."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

import torch
from torch import nn
from ..errors import ConfigError, ConfigKeyError, ConfigTypeError

# What an objective can ask of a training step (the loop builds only what some objective needs):
NEEDS = frozenset({
    "captions",     # the batch's captions (and hard negatives) and their joint-space embeddings
    "local_views",  # the small multi-crop views (data.n_local of them)
    "teacher",      # the shared EMA teacher (image encoder + the heads objectives register)
    "corrupted",    # the global views with patch-aligned blocks corrupted (data.masking)
})


class Objective(nn.Module):
    """One training objective: declares its needs, owns its heads and state, returns its named terms.

    Subclasses set ``name`` (the config key and the prefix of their logged terms), ``needs`` (a subset of
    :data:`NEEDS`) and ``Options`` (a dataclass of their options, each with a default and a one-line comment; the
    config's ``objectives.<name>`` mapping is validated against it). Heads are submodules; running state (centres,
    queues) lives in buffers, so checkpoints and resumption carry both. Terms are unweighted: the loop multiplies
    each by the objective's ``weight`` and sums.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()

    @dataclasses.dataclass
    class Options:
        pass

    def __init__(self, model: nn.Module, options: Any):
        super().__init__()
        self.options = options

    def model_parts(self) -> set[str]:
        """Top-level parts of the model this objective trains (the rest of the model is frozen when no objective
        trains it). Default: the image encoder."""
        return {"image_encoder"}

    def teacher_heads(self) -> dict[str, nn.Module]:
        """Student heads that the shared EMA teacher keeps a momentum copy of, by key (default: none)."""
        return {}

    def forward(self, ctx) -> dict[str, torch.Tensor]:
        """Computes this objective's terms from a :class:`~vilseg.objectives.context.StepContext`."""
        raise NotImplementedError

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step (e.g. to clamp a parameter)."""

    def log_values(self, model: nn.Module, step: int, total_steps: int) -> dict[str, float]:
        """Scalars worth logging besides the terms (temperatures, scales)."""
        return {}


REGISTRY: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: makes ``cls`` available in configs under ``cls.name``."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"objective name {cls.name!r} is empty or already registered")
    if not cls.needs <= NEEDS:
        raise ValueError(f"objective {cls.name!r} needs unknown inputs {sorted(cls.needs - NEEDS)}")
    REGISTRY[cls.name] = cls
    return cls


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Validates (and for tuples converts) one option value against its dataclass annotation."""
    hint = typing.get_origin(annotation) or annotation
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigTypeError(f"{where} must be a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigTypeError(f"{where} must be an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigTypeError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigTypeError(f"{where} must be a string, got {value!r}")
        return value
    if hint is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigTypeError(f"{where} must be a list of {len(args)} values, got {value!r}")
        return tuple(_check_type(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    return value


def parse_options(cls: type, values: dict[str, Any], where: str):
    """Builds an options dataclass from a config mapping, naming the key, the value and what was expected."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:  # "weight" is every objective's own option (build_objectives reads it)
        raise ConfigKeyError(f"unknown option(s) {unknown} in {where}; valid options: {sorted({'weight', *fields})}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _check_type(v, hints[k], f"{where}.{k}") for k, v in values.items()})


def build_objectives(spec: dict[str, Any], model: nn.Module) -> tuple[nn.ModuleDict, dict[str, float]]:
    """Objectives from the config's ``objectives`` mapping (name -> {weight, options...}).

    An objective with weight 0 is switched off (not built, not computed). Returns the objectives (in config order)
    and their weights.

    Raises:
        KeyError: an unknown objective or option, naming it and what is known.
        TypeError / ValueError: a bad value, naming the key.
    """
    objectives = nn.ModuleDict()
    checked = check_objectives(spec)
    for name, (weight, options) in checked.items():
        objectives[name] = REGISTRY[name](model, options)
    return objectives, {name: weight for name, (weight, _) in checked.items()}


def check_objectives(spec: dict[str, Any]) -> dict[str, tuple[float, Any]]:
    """Validates the ``objectives`` mapping without a model (names, weights, option names and types): name ->
    (weight, options) of the objectives with a non-zero weight, in config order. Checks that need the model (e.g.
    a block index against its depth) happen when the objective is built.

    Raises:
        ConfigError: naming the objective, the option and what is known or expected.
    """
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"objectives must be a non-empty mapping of objective name to options, got {spec!r}")
    out = {}
    for name, values in spec.items():
        if name not in REGISTRY:
            raise ConfigKeyError(f"unknown objective {name!r} in objectives; known objectives: {sorted(REGISTRY)}")
        if values is not None and not isinstance(values, dict):
            raise ConfigTypeError(f"objectives.{name} must be a mapping of options, got {values!r}")
        values = dict(values or {})
        weight = _check_type(values.pop("weight", 1.0), float, f"objectives.{name}.weight")
        if weight < 0:
            raise ConfigError(f"objectives.{name}.weight must be >= 0, got {weight}")
        options = parse_options(REGISTRY[name].Options, values, f"objectives.{name}")
        if weight > 0:
            out[name] = (weight, options)
    if not out:
        raise ConfigError("objectives: every weight is zero, nothing to train")
    return out
