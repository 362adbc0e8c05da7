"""Config dataclasses for every tower. YAML/JSON sub-dicts map 1:1 onto them; only the factory reads them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any
from ..errors import ConfigKeyError


@dataclass
class ImageEncoderConfig:
    timm_name: str = "vit_tiny_patch16_224"  # any timm VisionTransformer architecture
    img_size: int = 224  # training resolution; other sizes work (dynamic_img_size), pos-embeds are resampled
    patch_size: int = 16
    pretrained: bool = False  # timm pretrained weights (downloads; never used by tests or the demo)
    checkpoint_path: str | None = None  # local timm/safetensors checkpoint of the ViT
    conv_stem: bool = False  # replace the linear patch projection by stride-2 3x3 convs (Xiao et al. 2021): faster,
    # better learning of local shape from scratch; patch size must be a power of 2; not with pretrained=True.
    # Its receptive field crosses patch borders: masked-image modelling should then corrupt pixels (GMML-style),
    # since a mask token hides a patch's token but not its pixels from the neighbouring tokens.
    pool: str = "avg"  # "avg": mean of patch tokens (makes the global embedding a mean of patch embeddings); "token"
    mask_token: bool = False  # learnable token replacing masked patches (masked-image-modelling objectives)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # input normalisation, stored so inference preprocesses identically
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # depth, embed_dim, num_heads, ... passed to timm


@dataclass
class TextEncoderConfig:
    backend: str = "hf"  # "hf" (transformers AutoModel, mean pooling) or "open_clip" (open_clip text tower)
    name: str = "sentence-transformers/all-MiniLM-L6-v2"  # hf: local dir or hub id; open_clip: model config name
    pretrained: str | None = None  # open_clip: pretrained tag or local checkpoint file; hf: unused (name is loaded)
    random_init: bool = False  # hf: build from config only (no weights); open_clip: implied by pretrained=None
    context_length: int = 32  # tokens per caption (open_clip towers get their positional table resized to this)
    freeze: bool = False  # keep the text tower fixed (its embedding space then anchors open-world naming)
    text_cfg: dict[str, Any] = field(default_factory=dict)  # open_clip: overrides of the model's text_cfg


@dataclass
class CLIPConfig:
    """A CLIP to start from: both towers, its projections and its logit scale (vilseg/models/clip.py).

    With ``name`` set, the ``image`` and ``text`` towers, ``embed_dim`` and the logit scale are the CLIP's; the
    ``image`` and ``text`` sections are derived from it (only ``image.mask_token`` and ``text.freeze`` stay yours).
    """

    name: str | None = None  # open_clip model name ("ViT-B-16", "ViT-B-16-quickgelu") or "local-dir:FOLDER" (a
    # folder in open_clip's format: open_clip_config.json + weights); None: no CLIP
    pretrained: str | None = None  # open_clip pretrained tag ("laion2b_s34b_b88k", "openai": open_clip fetches it, or
    # reads its cache) or a local file of open_clip's state dict (.bin/.pt/.pth read with weights_only, or
    # .safetensors); None: random weights (tests) or, with local-dir:, the folder's own weights
    quick_gelu: bool | None = None  # None: as the pretrained tag was trained (OpenAI's tags use QuickGELU); set it
    # for a local file of a QuickGELU model, or use a "-quickgelu" model name
    image_size: int | None = None  # training resolution; None: the CLIP's (position embeddings are resampled by timm)
    context_length: int | None = None  # tokens per caption; None: the CLIP's own (77). Shorter cuts the positional
    # table: a causal text tower gives the same features for every caption that fits
    model_cfg: dict[str, Any] = field(default_factory=dict)  # the resolved open_clip model config: filled when the
    # model is built, saved with an export, so that the export rebuilds offline from its own config


@dataclass
class ModelConfig:
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    clip: CLIPConfig = field(default_factory=CLIPConfig)  # start from a CLIP (both towers, joint space kept)
    embed_dim: int = 256  # joint image-text width
    n_clusters: int = 32  # C, clusters of the online clustering head
    cluster_hidden: int = 256
    init_logit_scale: float = 2.6593  # ln(1/0.07), CLIP's initial temperature
    n_prototypes: int = 0  # K SlotCon prototypes (a slot head, trained by the slotcon objective); 0: none
    prototype_dim: int = 128  # the slot head's projection width
    prototype_hidden: int = 512  # the slot head's projector hidden width


def _build(cls, data: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigKeyError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        if f.name == "image":
            value = _build(ImageEncoderConfig, value, f"{where}.image")
        elif f.name == "text":
            value = _build(TextEncoderConfig, value, f"{where}.text")
        elif f.name == "clip":
            value = _build(CLIPConfig, value or {}, f"{where}.clip")
        elif f.name in ("mean", "std"):
            value = tuple(float(v) for v in value)
        kwargs[f.name] = value
    return cls(**kwargs)


def model_config_from_dict(data: dict[str, Any], where: str = "model config") -> ModelConfig:
    """Builds a ModelConfig from a nested dict, rejecting misspelt keys with their dotted location."""
    return _build(ModelConfig, data, where)


def deep_update(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """Returns base updated recursively by delta (dicts merge, everything else replaces)."""
    out = dict(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out
