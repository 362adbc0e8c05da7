"""The field's training-free dense read-outs: a ViT's last block computed another way for its patch tokens.

Each function takes a timm ViT ``Block``, the tokens entering it, ``x`` [B, P + N, D] (P = ``prefix`` tokens, then the
N patches of the h x w ``grid``), and returns what the block would hand to the final norm (``ln_post``) under that
read-out, [B, P + N, D]. The encoder then applies ``ln_post`` and the model its joint projection (CLIP's ``proj``) to
every patch token, exactly as it reads the class token: :meth:`vilseg.models.ImageEncoder.forward` (``readout=``) and
the naming strategies of :mod:`vilseg.inference.strategies` that use them.

Notation: LN1, LN2 the block's norms; W_q, W_k, W_v (with biases) its fused ``qkv`` projection, per head of width d;
s = d^-1/2; O the attention's output projection (``attn.proj``); MLP the block's feed-forward. Each formula is the
one in its authors' public code (matched on identical inputs: docs/diagnostics/readouts_vs_authors.py), which in
two cases is not what a short summary of the paper suggests: MaskCLIP's and SCLIP's code keep the last block's
residual and feed-forward; NACLIP's "reduced" architecture drops both.
"""
from __future__ import annotations

import torch
from torch import nn


def _heads(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, T, D] normed tokens -> q, k, v, each [B, H, T, d] (timm's fused qkv, its q/k norms applied)."""
    b, t, _ = x.shape
    qkv = attn.qkv(x).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def _output(attn: nn.Module, weights: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
    """O(A v) for [B, H, T, T] attention weights (None: the identity, each token its own value), [B, T, D]."""
    out = v if weights is None else weights @ v  # [B, H, T, d]
    b, _, t, _ = out.shape
    return attn.proj(attn.norm(out.transpose(1, 2).reshape(b, t, attn.attn_dim)))


def maskclip(block: nn.Module, x: torch.Tensor, grid: tuple[int, int], prefix: int = 1) -> torch.Tensor:
    """MaskCLIP (Zhou et al., ECCV 2022): every token attends to itself alone; the rest of the block is unchanged.

        y = x + O(W_v LN1(x) + b_v)          out = y + MLP(LN2(y))

    As chongzhou96/MaskCLIP's ViT backbone computes the value path of its last layer (``return_qkv``: ``v += x``,
    then ``ffn(norm2(v), identity=v)``), which CLIPSelf's ``forward_without_attn`` also uses."""
    _, _, v = _heads(block.attn, block.norm1(x))
    y = x + block.ls1(_output(block.attn, None, v))
    return y + block.ls2(block.mlp(block.norm2(y)))


def sclip(block: nn.Module, x: torch.Tensor, grid: tuple[int, int], prefix: int = 1) -> torch.Tensor:
    """SCLIP (Wang et al., ECCV 2024): correlative self-attention in the last block.

        A = softmax(s q q^T) + softmax(s k k^T)      y = x + O(A v)      out = y + MLP(LN2(y))

    over all tokens (the class token included), per head; as wangf3014/SCLIP's ``custom_attn(csa=True)``, whose last
    block keeps the residual and the feed-forward."""
    q, k, v = _heads(block.attn, block.norm1(x))
    weights = (q @ q.transpose(-2, -1) * block.attn.scale).softmax(-1) \
        + (k @ k.transpose(-2, -1) * block.attn.scale).softmax(-1)
    y = x + block.ls1(_output(block.attn, weights, v))
    return y + block.ls2(block.mlp(block.norm2(y)))


def neighbourhood(grid: tuple[int, int], prefix: int, std: float, device=None) -> torch.Tensor:
    """NACLIP's Gaussian prior on the attention logits, [P + N, P + N]: exp(-|p_i - p_j|^2 / (2 std^2)) for two
    patches at grid positions p_i, p_j (in patches), 0 wherever a prefix token is involved."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1).float()  # [N, 2]
    omega = torch.exp(-torch.cdist(pos, pos).square() / (2 * std ** 2))
    out = torch.zeros(prefix + h * w, prefix + h * w, device=device)
    out[prefix:, prefix:] = omega
    return out


def naclip(block: nn.Module, x: torch.Tensor, grid: tuple[int, int], prefix: int = 1,
           std: float = 5.0) -> torch.Tensor:
    """NACLIP (Hajimiri et al., WACV 2025): key-key attention plus a Gaussian neighbourhood prior, in a last block
    without residual and feed-forward (its "reduced" architecture).

        A = softmax(s k k^T + Omega)      out = O(A v)

    Omega from :func:`neighbourhood` (std 5 patches, the authors' default); as sinahmr/NACLIP's
    ``custom_attn(attn_strategy='naclip')`` with ``arch='reduced'``."""
    _, k, v = _heads(block.attn, block.norm1(x))
    omega = neighbourhood(grid, prefix, std, x.device).to(k.dtype)
    weights = (k @ k.transpose(-2, -1) * block.attn.scale + omega).softmax(-1)
    return _output(block.attn, weights, v)


READOUTS = {"maskclip": maskclip, "sclip": sclip, "naclip": naclip}
