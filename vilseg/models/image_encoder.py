"""ViT image encoder over any timm VisionTransformer, with a first-class dense API."""
from __future__ import annotations

import math
from dataclasses import dataclass

import timm
import torch
from torch import nn


@dataclass
class ImageFeatures:
    """Output of :class:`ImageEncoder`.

    Attributes:
        global_token: [B, D] global embedding (mean of patch tokens, or the class token).
        patch_tokens: [B, N, D] patch tokens in raster order, N = h * w.
        grid: (h, w) patch grid of this input.
        hidden: with ``keep_block=j``, the [B, P + N, D] tokens (P prefix tokens, then the patches) entering block j,
            for :meth:`ImageEncoder.encode_segments`; None otherwise.
        readout_tokens: with ``readout=``, the [B, N, D] patch tokens of that dense read-out of the last block (after
            the final norm, as ``patch_tokens``); None otherwise.
    """

    global_token: torch.Tensor
    patch_tokens: torch.Tensor
    grid: tuple[int, int]
    hidden: torch.Tensor | None = None
    readout_tokens: torch.Tensor | None = None


def tokens_to_map(patch_tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Reshapes [B, N, D] patch tokens to a [B, D, h, w] feature map."""
    b, n, d = patch_tokens.shape
    h, w = grid
    if n != h * w:
        raise ValueError(f"{n} patch tokens do not fill a {h}x{w} grid")
    return patch_tokens.transpose(1, 2).reshape(b, d, h, w)


class ImageEncoder(nn.Module):
    """Wraps a timm ViT; returns global and patch tokens and accepts a patch mask.

    Args:
        vit: a timm ``VisionTransformer`` built with ``dynamic_img_size=True`` and no pooling/head.
        pool: ``"avg"`` (mean of patch tokens) or ``"token"`` (class token).
        use_mask_token: create a learnable token that replaces masked patches.
        mean: per-channel input mean (stored for inference preprocessing).
        std: per-channel input std.
    """

    def __init__(self, vit: nn.Module, pool: str = "avg", use_mask_token: bool = False,
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        super().__init__()
        if pool not in ("avg", "token"):
            raise ValueError(f"image.pool must be 'avg' or 'token', got {pool!r}")
        if pool == "token" and vit.cls_token is None:
            raise ValueError("image.pool='token' needs a ViT with a class token")
        self.vit = vit
        self.pool = pool
        self.width = vit.embed_dim
        self.patch_size = vit.patch_embed.patch_size[0]
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, self.width)) if use_mask_token else None
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def depth(self) -> int:
        """Number of transformer blocks."""
        return len(self.vit.blocks)

    def forward(self, images: torch.Tensor, patch_mask: torch.Tensor | None = None,
                keep_block: int | None = None, readout=None) -> ImageFeatures:
        """Encodes normalised images.

        Args:
            images: [B, 3, H, W] float, already normalised with ``mean``/``std``; H and W multiples of the patch size.
            patch_mask: optional [B, h, w] or [B, N] bool, True where a patch is replaced by the mask token.
            keep_block: also return the tokens entering this block (0..depth-1) as ``hidden``.
            readout: a dense read-out of the last block (:mod:`vilseg.models.readouts`: ``fn(block, x, grid,
                prefix)``), whose patch tokens are returned as ``readout_tokens``; the last block also runs as
                usual, for the global token and ``patch_tokens``.

        Returns:
            ImageFeatures with [B, D] global token and [B, N, D] patch tokens.
        """
        if images.shape[-1] % self.patch_size or images.shape[-2] % self.patch_size:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of patch {self.patch_size}")
        x = self.vit.patch_embed(images)  # [B, h, w, D] (NHWC because dynamic_img_size=True)
        b, h, w, d = x.shape
        if patch_mask is not None:
            if self.mask_token is None:
                raise ValueError("a patch_mask was given but the encoder has no mask token (set image.mask_token)")
            x = torch.where(patch_mask.reshape(b, h, w, 1), self.mask_token.to(x.dtype), x)
        x = self.vit._pos_embed(x)  # [B, prefix + N, D]; resamples position embeddings to (h, w)
        x = self.vit.patch_drop(x)
        x = self.vit.norm_pre(x)
        hidden = read = None
        prefix = self.vit.num_prefix_tokens
        if keep_block is None and readout is None:
            x = self.vit.blocks(x)
        else:
            if keep_block is not None and not 0 <= keep_block < self.depth:
                raise ValueError(f"keep_block must be in [0, {self.depth - 1}], got {keep_block}")
            for i, block in enumerate(self.vit.blocks):
                if i == keep_block:
                    hidden = x
                if readout is not None and i == self.depth - 1:
                    read = self.vit.norm(readout(block, x, (h, w), prefix))[:, prefix:]  # [B, N, D]
                x = block(x)
        x = self.vit.norm(x)
        patches = x[:, prefix:]  # [B, N, D]
        global_token = patches.mean(1) if self.pool == "avg" else x[:, 0]
        return ImageFeatures(global_token, patches, (h, w), hidden, read)

    def encode_segments(self, hidden: torch.Tensor, masks: torch.Tensor, start_block: int) -> torch.Tensor:
        """Global tokens of every segment encoded on its own from block ``start_block`` on, all in one pass.

        Each segment s of an image gets its own copy of the prefix tokens (the class token, registers) and of its
        patches' tokens as they enter block ``start_block`` (``hidden``, from ``forward(..., keep_block=...)``). In the
        remaining blocks every copy attends only to the copies of its own segment: one sequence per image of
        ``S * P + sum_s |s|`` tokens under a block-diagonal attention mask (``scaled_dot_product_attention``'s boolean
        mask, i.e. an additive bias of 0 within a segment and -inf across), so the image's own tokens are not
        touched. A segment's global token is then read as :meth:`forward` reads an image's: the final norm, then the
        mean of its patch tokens (``pool="avg"``) or its class token (``pool="token"``). With ``start_block=0`` and
        one segment covering the image this is :meth:`forward`'s ``global_token`` exactly; with ``start_block=0`` in
        general it is the segment encoded as an image of its own patches (at their positions), nothing else.
        Segments may overlap (training regions) or partition the image (the Segmenter's).

        Args:
            hidden: [B, P + N, D] tokens entering block ``start_block``.
            masks: [B, S, N] bool, the patches of each segment (an empty segment reads zeros).
            start_block: first block in which segments are separated (depth - k for the last k blocks).

        Returns:
            [B, S, D] segment tokens.
        """
        b, total, d = hidden.shape
        prefix = self.vit.num_prefix_tokens
        if masks.dim() != 3 or masks.shape[0] != b or masks.shape[2] != total - prefix:
            raise ValueError(f"masks must be [{b}, S, {total - prefix}], got {list(masks.shape)}")
        s, device = masks.shape[1], hidden.device
        # candidate slots: (segment, token) for every token; a slot is used if the token is a prefix token or one of
        # the segment's patches. The used slots of an image, in order, are its sequence.
        used = torch.cat([masks.new_ones(b, s, prefix), masks], 2).flatten(1)  # [B, S * (P + N)]
        source = torch.arange(total, device=device).repeat(s)  # token of each slot
        group = torch.arange(s, device=device).repeat_interleave(total)  # segment of each slot
        counts = used.sum(1)
        length = int(counts.max())
        order = torch.argsort((~used).to(torch.uint8), dim=1, stable=True)[:, :length]  # used slots first
        src, grp = source[order], group[order]  # [B, length]
        position = torch.arange(length, device=device)[None]
        valid = position < counts[:, None]
        grp = torch.where(valid, grp, -1 - position)  # padding: each slot a group of its own
        x = torch.gather(hidden, 1, src[..., None].expand(-1, -1, d))
        mask = (grp[:, :, None] == grp[:, None, :])[:, None]  # [B, 1, length, length]
        for block in self.vit.blocks[start_block:]:
            x = block(x, attn_mask=mask)
        x = self.vit.norm(x)
        # read-out: the class token's copy (token pooling) or the mean of the patch copies (average pooling)
        take = valid & (src == 0) if self.pool == "token" else valid & (src >= prefix)
        index = torch.where(take, grp, 0)[..., None].expand(-1, -1, d)
        weight = take.to(x.dtype)[..., None]
        sums = x.new_zeros(b, s, d).scatter_add(1, index, x * weight)
        sizes = x.new_zeros(b, s, 1).scatter_add(1, index[..., :1], weight)
        return sums / sizes.clamp_min(1)

    def normalize(self, images01: torch.Tensor) -> torch.Tensor:
        """Maps [B, 3, H, W] images in [0, 1] to the encoder's input normalisation."""
        return (images01 - self.mean) / self.std


def conv_stem(patch_size: int, dim: int) -> nn.Sequential:
    """log2(patch) stride-2 3x3 convolutions mapping [B, 3, H, W] to [B, dim, H/patch, W/patch].

    "Early convolutions help transformers see better" (Xiao et al. 2021). GroupNorm(1, C) rather than BatchNorm,
    so that single-image inference behaves exactly as training. Widths double up to ``dim``.
    """
    n = int(math.log2(patch_size))
    if 2**n != patch_size or n < 1:
        raise ValueError(f"image.conv_stem needs a power-of-two patch size, got {patch_size}")
    layers, channels = [], 3
    for i in range(n):
        width = dim // 2 ** (n - 1 - i)
        layers.append(nn.Conv2d(channels, width, 3, stride=2, padding=1))
        if i < n - 1:
            layers += [nn.GroupNorm(1, width), nn.GELU()]
        channels = width
    return nn.Sequential(*layers)


def build_image_encoder(cfg) -> ImageEncoder:
    """Builds an :class:`ImageEncoder` from an ``ImageEncoderConfig``."""
    kwargs = dict(cfg.timm_kwargs)
    vit = timm.create_model(
        cfg.timm_name, pretrained=cfg.pretrained, img_size=cfg.img_size, patch_size=cfg.patch_size,
        num_classes=0, global_pool="", dynamic_img_size=True, **kwargs,
    )
    if cfg.conv_stem:
        if cfg.pretrained or cfg.checkpoint_path:
            raise ValueError("image.conv_stem replaces the patch projection: it cannot be combined with pretrained weights")
        vit.patch_embed.proj = conv_stem(cfg.patch_size, vit.embed_dim)
    if not hasattr(vit, "_pos_embed") or not hasattr(vit, "blocks"):
        raise ValueError(f"timm model {cfg.timm_name!r} is not a VisionTransformer")
    if cfg.checkpoint_path:
        load_vit_checkpoint(vit, cfg.checkpoint_path, "image.checkpoint_path")
    return ImageEncoder(vit, pool=cfg.pool, use_mask_token=cfg.mask_token, mean=cfg.mean, std=cfg.std)


CLASSIFIER_PARTS = ("head.", "fc_norm.", "head_drop.")  # a checkpoint's classifier: no place for it in an encoder


def load_vit_checkpoint(vit: nn.Module, path, where: str) -> list[str]:
    """Loads a timm ViT checkpoint into ``vit`` through timm's own reader and key converter (``load_state_dict``
    with ``weights_only=True``, or safetensors; ``checkpoint_filter_fn``, which also resamples position
    embeddings), and checks that every tensor of the ViT came from the file. A classifier head in the file is
    dropped with a warning that names it. Returns the names of the ViT's tensors that were loaded.

    Raises:
        ConfigError: ``where`` and the file named, when the file does not exist, is an open_clip CLIP (whose joint
            space would be lost: start from it with ``clip.name``), or lacks a tensor of the ViT or holds one the ViT
            has no place for.
    """
    import warnings
    from pathlib import Path

    from timm.models import load_state_dict
    from timm.models.vision_transformer import checkpoint_filter_fn

    from ..errors import ConfigError, ConfigFileError

    if not Path(path).is_file():
        raise ConfigFileError(f"{where}={str(path)!r}: no such file")
    try:
        state = load_state_dict(str(path))
    except Exception as exn:  # torch, safetensors and timm raise their own types for foreign files
        raise ConfigError(f"{where}={str(path)!r} is not a readable checkpoint: {str(exn).splitlines()[0][:200]}") \
            from None
    if "visual.class_embedding" in state or "module.visual.class_embedding" in state:
        raise ConfigError(f"{where}={str(path)!r} is a CLIP (open_clip/OpenAI) checkpoint: start from it with "
                          f"model.overrides.clip.name=<its open_clip model, e.g. ViT-B-16> and clip.pretrained="
                          f"{path}, which keeps its text tower and joint space (configs/clip/)")
    try:
        converted = checkpoint_filter_fn(state, vit)
        missing, unexpected = vit.load_state_dict(converted, strict=False)
    except RuntimeError as exn:  # a tensor of another shape: another architecture
        from .hub import mismatch_summary

        raise ConfigError(f"{where}={str(path)!r} does not fit the image encoder: {mismatch_summary(str(exn))}") \
            from None
    dropped = [k for k in unexpected if k.startswith(CLASSIFIER_PARTS)]
    unexpected = [k for k in unexpected if k not in dropped]
    if missing or unexpected:
        total = len(vit.state_dict())
        raise ConfigError(f"{where}={str(path)!r} does not fit the image encoder: {len(missing)} of its {total} "
                          f"tensors are not in the file (e.g. {missing[:3]}), {len(unexpected)} of the file's have no "
                          f"place in it (e.g. {unexpected[:3]}); refusing to train a partly random encoder")
    if dropped:
        warnings.warn(f"{where}={path}: dropped the file's classifier ({', '.join(dropped[:4])}): the encoder has no "
                      f"head")
    return [k for k in vit.state_dict() if k in converted]
