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


class SlotHead(nn.Module):
    """SlotCon's dense projector and K learnable prototypes: patch tokens -> (projected features, their cosine to
    every prototype). The features are returned as the projector gives them: SlotCon's slots pool them raw (its
    authors' ``SemanticGrouping``), and only the cosine normalises them. Part of the model when ``n_prototypes > 0``: trained by the ``slotcon`` objective,
    exported with the model, and the ``slots`` grouping of the Segmenter reads it (the arg-max prototype per patch).

    Args:
        in_dim: patch-token width D.
        hidden: projector hidden width.
        dim: projection width.
        n_prototypes: K.
    """

    def __init__(self, in_dim: int, hidden: int, dim: int, n_prototypes: int):
        super().__init__()
        self.projector = mlp(in_dim, hidden, dim)
        self.prototypes = nn.Parameter(torch.randn(n_prototypes, dim) * 0.02)

    def forward(self, patch_tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N, D] -> ([B, dim, h, w] projected features, [B, K, h, w] cosines to the prototypes)."""
        from .image_encoder import tokens_to_map

        x = tokens_to_map(self.projector(patch_tokens), grid)
        dots = torch.einsum("kd,bdhw->bkhw", nn.functional.normalize(self.prototypes, dim=-1),
                            nn.functional.normalize(x, dim=1))
        return x, dots
