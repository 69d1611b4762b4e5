"""Projection heads that map pooled features to the contrastive embedding."""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ProjectionMLP", "GlobalEmbeddingHead"]


class ProjectionMLP(nn.Sequential):
    """Linear(in, hidden) -> ReLU -> Linear(hidden, out): MoCo v2's 2-layer MLP head."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
        )


class GlobalEmbeddingHead(nn.Module):
    """Global average pool -> :class:`ProjectionMLP` -> L2 normalisation."""

    def __init__(self, in_channels: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.mlp = ProjectionMLP(in_channels, hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (N, C, H, W) feature map.
        Returns:
            (N, out_dim) unit-norm embeddings.
        """
        return F.normalize(self.mlp(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)), dim=1)
