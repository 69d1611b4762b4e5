"""Projection heads that map pooled features to the contrastive embedding."""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ProjectionMLP", "GlobalEmbeddingHead"]


class ProjectionMLP(nn.Sequential):
    """
    Linear(in, hidden) -> [norm] -> ReLU -> Linear(hidden, out): MoCo v2's 2-layer MLP head.

    ``norm="BN"`` adds BatchNorm1d after the first layer, as SimCLR's and MoCo v3's heads do
    (``MODEL.CONTRAST.MLP_NORM``; the parameter names without it are unchanged).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, norm: str = ""):
        if norm not in ("", "BN"):
            raise ValueError(f"MODEL.CONTRAST.MLP_NORM must be '' or 'BN', got {norm!r}")
        layers = [nn.Linear(in_dim, hidden_dim)]
        if norm == "BN":
            layers.append(nn.BatchNorm1d(hidden_dim))
        super().__init__(*layers, nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class GlobalEmbeddingHead(nn.Module):
    """Global average pool -> :class:`ProjectionMLP` -> L2 normalisation."""

    def __init__(self, in_channels: int, hidden_dim: int, out_dim: int, norm: str = ""):
        super().__init__()
        self.mlp = ProjectionMLP(in_channels, hidden_dim, out_dim, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (N, C, H, W) feature map.
        Returns:
            (N, out_dim) unit-norm embeddings.
        """
        return F.normalize(self.mlp(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)), dim=1)
