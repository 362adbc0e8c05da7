"""Where a training stage's image encoder starts: another stage's export, a timm checkpoint, or scratch."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, ConfigFileError
from ..models.vilseg import CONFIG_NAME, WEIGHTS_NAME

PREFIX = "image_encoder."


def _summarise(names: list[str], depth: int = 3) -> list[str]:
    """Groups tensor names by their first ``depth`` dotted parts, with counts (readable logs)."""
    groups: dict[str, int] = {}
    for name in names:
        key = ".".join(name.split(".")[:depth])
        groups[key] = groups.get(key, 0) + 1
    return [f"{k} ({n})" if n > 1 else k for k, n in groups.items()]


def init_image_encoder(model: nn.Module, source: str | Path) -> dict:
    """Initialises ``model.image_encoder`` from ``source`` and reports which tensors loaded and which are new.

    Args:
        model: a freshly built :class:`~vilseg.ViLSeg`.
        source: a directory written by ``save_pretrained`` (another stage's export: only its ``image_encoder.*``
            tensors are copied, bit for bit; every other tensor of ``model`` keeps its fresh initialisation), or a
            timm ViT checkpoint file.

    Returns:
        a report: ``source``, ``kind``, ``loaded`` and ``new`` (tensor names of ``model``), and summaries of both.

    Raises:
        FileNotFoundError: ``source`` is neither an export directory nor a file.
        ValueError: an image-encoder tensor is missing from the export or has another shape (names it).
    """
    source = Path(source)
    state = model.state_dict()
    if source.is_dir():
        from safetensors import safe_open

        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (source / name).is_file():
                raise ConfigFileError(f"model.init_from={str(source)!r}: {name} not found (not a vilseg export)")
        wanted = [k for k in state if k.startswith(PREFIX)]
        with safe_open(str(source / WEIGHTS_NAME), framework="pt") as f:
            available = set(f.keys())
            missing = [k for k in wanted if k not in available]
            if missing:
                raise ConfigError(f"model.init_from={str(source)!r} lacks image-encoder tensors {missing[:5]} "
                                 f"({len(missing)} in all): was it built with another image encoder?")
            loaded = {k: f.get_tensor(k) for k in wanted}
        for k, v in loaded.items():
            if v.shape != state[k].shape:
                raise ConfigError(f"model.init_from={str(source)!r}: {k} has shape {tuple(v.shape)}, this model's "
                                 f"has {tuple(state[k].shape)}")
        model.load_state_dict(loaded, strict=False)
        kind = "vilseg export (image encoder only); source config: " + json.loads(
            (source / CONFIG_NAME).read_text())["image"]["timm_name"]
        names = list(loaded)
    elif source.is_file():
        from ..models.image_encoder import load_vit_checkpoint

        names = [PREFIX + "vit." + k for k in load_vit_checkpoint(model.image_encoder.vit, source, "model.init_from")]
        kind = "timm checkpoint"
    else:
        raise ConfigFileError(f"model.init_from={str(source)!r} is neither a vilseg export directory nor a "
                                f"checkpoint file")
    return init_report(model, str(source), kind, names)


def init_report(model: nn.Module, source: str, kind: str, loaded: list[str]) -> dict:
    """Which of the model's tensors came from ``source`` and which are new (fresh initialisation), with readable
    summaries of both."""
    loaded_set = set(loaded)
    names = [k for k in model.state_dict() if k in loaded_set]
    new = [k for k in model.state_dict() if k not in loaded_set]
    return {"source": source, "kind": kind, "loaded": names, "new": new,
            "loaded_summary": _summarise(names), "new_summary": _summarise(new, depth=2)}


@torch.no_grad()
def freeze_unused(model: nn.Module, parts: set[str]) -> list[str]:
    """Sets ``requires_grad=False`` on every top-level part of ``model`` that no objective trains; returns them.

    An image-only stage never touches the text side or the clustering head: freezing them keeps the optimizer and
    DDP from tracking parameters that get no gradient.
    """
    frozen = []
    for name, param in model.named_parameters():
        if name.split(".")[0] not in parts and param.requires_grad:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


@torch.no_grad()
def freeze_parts(model: nn.Module, parts: list[str]) -> list[str]:
    """Sets ``requires_grad=False`` on every parameter under the named parts (``model.freeze``: top-level names such
    as ``text_encoder``, or dotted prefixes such as ``image_encoder.vit.patch_embed``); returns the names frozen.

    Raises:
        ConfigError: a part that names no parameter of the model.
    """
    names = [n for n, _ in model.named_parameters()]
    frozen = []
    for part in parts:
        hit = [n for n in names if n == part or n.startswith(part + ".")]
        if not hit:
            tops = sorted({n.split(".")[0] for n in names})
            raise ConfigError(f"model.freeze: {part!r} names no parameter of the model (its parts: {', '.join(tops)}; "
                              f"or a dotted prefix such as image_encoder.vit.blocks.0)")
        frozen += hit
    params = dict(model.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)
    return sorted(set(frozen))


def layer_id(name: str, depth: int) -> int:
    """The image encoder's layer of a parameter for layer-wise decay: 0 for what comes before the blocks (patch
    embedding, class token, position embeddings, mask token, ``norm_pre``), i + 1 for block i, depth + 1 after them
    (the final norm, the projection)."""
    import re

    found = re.search(r"\.blocks\.(\d+)\.", name)
    if found:
        return int(found.group(1)) + 1
    if any(part in name for part in ("patch_embed", "cls_token", "pos_embed", "reg_token", "mask_token", "norm_pre")):
        return 0
    return depth + 1
