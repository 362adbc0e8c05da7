"""Small heads: joint-space projections, the vision-contrast head and the online clustering head."""
from __future__ import annotations

import torch
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
