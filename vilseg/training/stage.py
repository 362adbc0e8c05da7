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


def load_timm_checkpoint(vit: nn.Module, path: str | Path) -> tuple[list[str], list[str]]:
    """Loads a timm ViT checkpoint (.safetensors, or .pth/.bin read with ``weights_only=True``: no code runs) through
    timm's own key filter (position-embedding resampling, ...). Returns (missing, unexpected) ViT keys."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    path = Path(path)
    if not path.is_file():
        raise ConfigFileError(f"timm checkpoint {str(path)!r} does not exist")
    keys = timm.models.load_checkpoint(vit, str(path), strict=False, filter_fn=checkpoint_filter_fn)
    return list(keys.missing_keys), list(keys.unexpected_keys)


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
        missing, _ = load_timm_checkpoint(model.image_encoder.vit, source)
        names = [PREFIX + "vit." + k for k in model.image_encoder.vit.state_dict() if k not in set(missing)]
        kind = "timm checkpoint"
    else:
        raise ConfigFileError(f"model.init_from={str(source)!r} is neither a vilseg export directory nor a "
                                f"checkpoint file")
    loaded_set = set(names)
    new = [k for k in state if k not in loaded_set]
    return {"source": str(source), "kind": kind, "loaded": names, "new": new,
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
