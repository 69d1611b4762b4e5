"""
Per-stage attention maps of frozen backbones, side by side (as DetCo's Fig. 4).

The map of a stage is the spatial attention of Zagoruyko & Komodakis (2017, "Paying More
Attention to Attention"): the mean over channels of the squared activations, upsampled to the
image and scaled to [0, 1] per map. It needs no labels and no gradients, so it works for any
checkpoint, random init included.
"""

import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .encoder import STAGES, ReadoutEncoder

__all__ = ["attention_maps", "overlay", "save_attention_figure"]


@torch.no_grad()
def attention_maps(
    encoder: ReadoutEncoder, image: torch.Tensor, stages: Sequence[str] = STAGES
) -> Dict[str, torch.Tensor]:
    """
    Args:
        image: (3, H, W) uint8 RGB.
    Returns:
        {stage: (H, W) float map in [0, 1]} on the CPU.
    """
    h, w = image.shape[-2:]
    maps = encoder.feature_maps(encoder.preprocess(image[None]), stages)
    out = {}
    for s in stages:
        a = maps[s].float().pow(2).mean(dim=1, keepdim=True)
        a = F.interpolate(a, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        lo, hi = a.min(), a.max()
        out[s] = ((a - lo) / (hi - lo).clamp_min(1e-12)).cpu()
    return out


def overlay(image: torch.Tensor, heat: torch.Tensor, alpha: float = 0.5) -> np.ndarray:
    """
    Args:
        image: (3, H, W) uint8 RGB; heat: (H, W) in [0, 1].
    Returns:
        (H, W, 3) uint8: the image blended with the 'jet' colour map of ``heat``.
    """
    from matplotlib import colormaps

    colour = colormaps["jet"](heat.numpy())[..., :3] * 255.0
    rgb = image.permute(1, 2, 0).numpy().astype(np.float32)
    return ((1 - alpha) * rgb + alpha * colour).clip(0, 255).astype(np.uint8)


def save_attention_figure(
    image: torch.Tensor,
    rows: List[Tuple[str, Dict[str, torch.Tensor]]],
    path: str,
    title: str = "",
):
    """
    Write one PNG: a row per checkpoint ([input, stage overlays...]), columns = stages.

    Args:
        image: (3, H, W) uint8 RGB.
        rows: (label, :func:`attention_maps` output) per checkpoint.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(rows[0][1])
    fig, axes = plt.subplots(
        len(rows),
        len(stages) + 1,
        figsize=(2.2 * (len(stages) + 1), 2.3 * len(rows)),
        squeeze=False,
    )
    rgb = image.permute(1, 2, 0).numpy()
    for i, (label, maps) in enumerate(rows):
        axes[i, 0].imshow(rgb)
        axes[i, 0].set_ylabel(label, fontsize=8)
        for j, s in enumerate(stages):
            axes[i, j + 1].imshow(overlay(image, maps[s]))
            if i == 0:
                axes[i, j + 1].set_title(s, fontsize=9)
        if i == 0:
            axes[i, 0].set_title("input", fontsize=9)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
