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
    """

    global_token: torch.Tensor
    patch_tokens: torch.Tensor
    grid: tuple[int, int]


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

    def forward(self, images: torch.Tensor, patch_mask: torch.Tensor | None = None) -> ImageFeatures:
        """Encodes normalised images.

        Args:
            images: [B, 3, H, W] float, already normalised with ``mean``/``std``; H and W multiples of the patch size.
            patch_mask: optional [B, h, w] or [B, N] bool, True where a patch is replaced by the mask token.

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
        x = self.vit.blocks(x)
        x = self.vit.norm(x)
        prefix = self.vit.num_prefix_tokens
        patches = x[:, prefix:]  # [B, N, D]
        global_token = patches.mean(1) if self.pool == "avg" else x[:, 0]
        return ImageFeatures(global_token, patches, (h, w))

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
    if cfg.checkpoint_path:
        timm.models.load_checkpoint(vit, cfg.checkpoint_path, strict=False)
    if not hasattr(vit, "_pos_embed") or not hasattr(vit, "blocks"):
        raise ValueError(f"timm model {cfg.timm_name!r} is not a VisionTransformer")
    return ImageEncoder(vit, pool=cfg.pool, use_mask_token=cfg.mask_token, mean=cfg.mean, std=cfg.std)
