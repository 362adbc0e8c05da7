"""Small heads: joint-space projections, the vision-contrast head and the online clustering head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Two-layer MLP with GELU; the shape every head here shares."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class ClusterHead(nn.Module):
    """Maps every patch embedding to logits over C clusters (IIC's Phi before the softmax).

    Args:
        in_dim: patch-token width D.
        hidden: MLP hidden width.
        n_clusters: C.
    """

    def __init__(self, in_dim: int, hidden: int, n_clusters: int):
        super().__init__()
        self.n_clusters = n_clusters
        self.net = mlp(in_dim, hidden, n_clusters)

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> [B, N, C] cluster logits."""
        return self.net(patch_tokens)


class TextCentering(nn.Module):
    """Locked, centred text space: the text tower's own geometry minus its common direction.

        y = x / ||x|| - m,   m = running mean of x / ||x|| over training captions (an EMA, updated in train mode)

    Sentence encoders are anisotropic (all-MiniLM-L6-v2: mean cosine 0.59 between unrelated captions of the demo
    world), so an image tower trained against the raw locked space (``text_proj: identity``) must resolve tiny
    angles. Subtracting the mean removes that shared direction and keeps every other direction, so words never
    seen in training (synonyms) keep their place relative to the trained ones, which a trained linear projection
    does not guarantee. No parameters; ``m`` is a buffer saved with the weights.

    Args:
        dim: text width.
        momentum: EMA weight of each new batch mean (the first batch initialises ``m``).
    """

    def __init__(self, dim: int, momentum: float = 0.01):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, W] text-tower features -> [B, W] centred (unnormalised) features."""
        x = F.normalize(x.float(), dim=-1)
        if self.training:
            with torch.no_grad():
                batch_mean = x.mean(0)
                if int(self.num_batches) == 0:
                    self.mean.copy_(batch_mean)
                else:
                    self.mean.lerp_(batch_mean, self.momentum)
                self.num_batches += 1
        return x - self.mean
