"""Text encoders: open_clip's text tower or any Hugging Face transformers encoder with mean pooling."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .hub import resolve_hf_name  # noqa: F401  (re-exported: callers import it from here)


class HFTokenizer:
    """Picklable callable: list of captions -> dict of [B, L] tensors (padded to ``max_length``)."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        out = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


class OpenCLIPTokenizer:
    """Picklable callable wrapping an open_clip tokenizer; the attention mask marks non-pad tokens."""

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = self.tokenizer(list(texts), context_length=self.context_length)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


class HFTextEncoder(nn.Module):
    """transformers ``AutoModel`` with attention-masked mean pooling (sentence-transformers style).

    Args:
        model: a transformers encoder returning ``last_hidden_state``.
        tokenizer: an :class:`HFTokenizer`.
    """

    def __init__(self, model: nn.Module, tokenizer: HFTokenizer):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.width = model.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L] ids and mask -> [B, width] mean of the non-padding token states.

        Columns that are padding in every row are cut first (the tokenizer pads to ``max_length``): they are masked
        out of attention and of the mean, so the output is unchanged. It saves time when the context length exceeds
        the batch's longest caption (``benchmarks/text_tower.py``: 1.37x at 32 tokens on the demo's captions).
        """
        used = attention_mask.bool().any(0).nonzero()  # columns holding a token in some row
        keep = int(used.max()) + 1 if len(used) else 1
        input_ids, attention_mask = input_ids[:, :keep], attention_mask[:, :keep]
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, W]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def save_assets(self, directory: Path) -> None:
        """Writes the architecture config and tokenizer so the tower can be rebuilt without its source."""
        self.model.config.save_pretrained(directory)
        self.tokenizer.tokenizer.save_pretrained(directory)


class OpenCLIPTextEncoder(nn.Module):
    """open_clip ``TextTransformer`` (any open_clip model config), pooled and projected by open_clip itself."""

    def __init__(self, tower: nn.Module, tokenizer: OpenCLIPTokenizer, width: int):
        super().__init__()
        self.tower = tower
        self.tokenizer = tokenizer
        self.width = width

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L] token ids -> [B, width] open_clip text features (EOT pooling + projection)."""
        return self.tower(input_ids)

    def save_assets(self, directory: Path) -> None:
        """open_clip configs and BPE vocabulary ship inside its wheel: nothing to write."""


def build_open_clip_text(cfg) -> OpenCLIPTextEncoder:
    """open_clip's text tower of model ``cfg.name``: with ``cfg.pretrained`` (a tag or a local file) the CLIP's own
    weights, loaded by ``open_clip.create_model`` (QuickGELU as the tag was trained: OpenAI's); otherwise random, with
    ``cfg.text_cfg`` overrides. Its positional table is cut to ``cfg.context_length`` when that is shorter (the same
    features for every caption that fits; :func:`vilseg.models.clip.clip_text_tower`)."""
    import copy

    import open_clip

    from ..errors import ConfigError
    from .clip import clip_text_tower, clip_tokenizer, create_open_clip
    from .config import CLIPConfig

    model_cfg = open_clip.get_model_config(cfg.name)
    if model_cfg is None:
        raise ConfigError(f"text.name={cfg.name!r} is not an open_clip model config; see open_clip.list_models()")
    model_cfg = copy.deepcopy(model_cfg)
    if cfg.pretrained is None:
        model_cfg["text_cfg"].update(cfg.text_cfg)
    elif cfg.text_cfg:
        raise ConfigError("text.text_cfg overrides cannot be combined with pretrained open_clip weights")
    if cfg.pretrained is not None and not Path(cfg.pretrained).is_file():
        tag = open_clip.get_pretrained_cfg(cfg.name, cfg.pretrained)
        model_cfg["quick_gelu"] = bool(tag.get("quick_gelu", model_cfg.get("quick_gelu", False)))
    clip = CLIPConfig(name=cfg.name, pretrained=cfg.pretrained, model_cfg=model_cfg)
    context = min(cfg.context_length, model_cfg["text_cfg"].get("context_length", 77))
    if cfg.pretrained is None:  # the text tower alone (what open_clip's CLIP builds for it): no image tower to build
        from types import SimpleNamespace

        from open_clip.model import _build_text_tower

        source = SimpleNamespace(text=_build_text_tower(model_cfg["embed_dim"], model_cfg["text_cfg"],
                                                        quick_gelu=model_cfg.get("quick_gelu", False)))
    else:
        source = create_open_clip(clip)
    tower = clip_text_tower(source, context)
    return OpenCLIPTextEncoder(tower, OpenCLIPTokenizer(clip_tokenizer(clip), context), width=model_cfg["embed_dim"])


def build_hf_text(cfg, asset_dir: str | os.PathLike | None = None) -> HFTextEncoder:
    """Builds the HF tower. With ``asset_dir`` (a saved vilseg model) only config+tokenizer are read from there."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    source = str(asset_dir) if asset_dir is not None else resolve_hf_name(cfg.name)
    tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(source), cfg.context_length)
    if asset_dir is not None or cfg.random_init:
        model = AutoModel.from_config(AutoConfig.from_pretrained(source))
    else:
        model, info = AutoModel.from_pretrained(source, output_loading_info=True)
        if info.get("missing_keys") or info.get("mismatched_keys"):
            from ..errors import ConfigError

            missing = list(info.get("missing_keys") or []) + [str(k) for k in info.get("mismatched_keys") or []]
            raise ConfigError(f"text.name={cfg.name!r}: the weights at {source} lack {len(missing)} tensors of the "
                              f"model (e.g. {missing[:3]}); refusing to train a partly random text tower")
    return HFTextEncoder(model, tokenizer)


def build_text_encoder(cfg, asset_dir=None) -> nn.Module:
    """Builds the text encoder named by a ``TextEncoderConfig`` and applies ``freeze``."""
    if cfg.backend == "hf":
        encoder = build_hf_text(cfg, asset_dir)
    elif cfg.backend == "open_clip":
        encoder = build_open_clip_text(cfg)
    else:
        raise ValueError(f"text.backend must be 'hf' or 'open_clip', got {cfg.backend!r}")
    if cfg.freeze:
        encoder.requires_grad_(False)
    return encoder


def tower_identity(model) -> str:
    """A fingerprint of what maps a caption to its text-tower features: the tower's weights and the text config
    (tokenizer, context length). Features stored with one identity are refused by a model with another
    (``data_prep text-features``); the trained text projection is not part of it."""
    return weights_identity(model, ("text_encoder.",))


def weights_identity(model, prefixes: tuple[str, ...]) -> str:
    """sha256 (32 hex digits) of the model's tensors under ``prefixes`` and of its text config."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(prefixes):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(repr(getattr(getattr(model, "config", None), "text", None)).encode())
    return digest.hexdigest()[:32]
