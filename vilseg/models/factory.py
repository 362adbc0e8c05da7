"""Model registry: one small JSON file per named variant in ``model_configs/``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ConfigKeyError
from .config import deep_update, model_config_from_dict
from .vilseg import ViLSeg, build_vilseg

_CONFIG_DIR = Path(__file__).parent / "model_configs"


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(p.stem for p in _CONFIG_DIR.glob("*.json"))


def get_model_config(name: str) -> dict[str, Any]:
    """The raw nested config dict of a registered variant."""
    path = _CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ConfigKeyError(f"unknown model {name!r}; registered models: {list_models()}")
    return json.loads(path.read_text())


def create_model(name: str, pretrained: str | None = None, **overrides: Any) -> ViLSeg:
    """Builds a registered model, optionally loading a ``save_pretrained`` directory.

    Args:
        name: a name from :func:`list_models`, or a directory written by ``save_pretrained``.
        pretrained: a ``save_pretrained`` directory whose weights are loaded (its config must match).
        **overrides: nested overrides of the variant's config, e.g. ``image={"img_size": 96}, n_clusters=16``.

    Returns:
        the model, in train mode, on CPU.
    """
    if Path(name).is_dir():
        if overrides:
            raise ConfigError("overrides cannot be applied when loading a saved model directory")
        return ViLSeg.from_pretrained(name)
    cfg = model_config_from_dict(deep_update(get_model_config(name), overrides), f"model {name!r} + overrides")
    model = build_vilseg(cfg)
    if pretrained is not None:
        loaded = ViLSeg.from_pretrained(pretrained)
        model.load_state_dict(loaded.state_dict())
    return model


def from_open_clip(name: str, pretrained: str | None = None, **overrides: Any) -> ViLSeg:
    """A vilseg model from an open_clip CLIP, both towers and their joint space kept (vilseg/models/clip.py).

    Args:
        name: an open_clip model name ("ViT-B-16"; "ViT-B-16-quickgelu" for OpenAI's weights) or "local-dir:FOLDER"
            (open_clip's folder format: open_clip_config.json and its weights).
        pretrained: a pretrained tag (open_clip fetches it, or reads its cache) or a local file of open_clip's state
            dict (None: random weights, or a folder's own).
        **overrides: as for :func:`create_model`: ``n_clusters=16``, ``clip={"image_size": 448}``,
            ``text={"freeze": False}``, ``image={"mask_token": True}``.
    """
    data = deep_update({"clip": {"name": name, "pretrained": pretrained}}, overrides)
    return build_vilseg(model_config_from_dict(data, f"open_clip model {name!r}"))
