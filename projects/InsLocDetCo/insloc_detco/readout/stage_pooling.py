"""
The per-stage features of DetCo's VOC07 SVM benchmark (Xie et al. 2021, Table 12), as the
authors' tools extract them (OpenSelfSup's ``MultiPooling`` "specified" pooling and its VOC07
extraction pipeline, which DetCo's ``benchmarks/`` call): every image resized so that its shorter
side is 256, then to 224 x 224 (the aspect ratio is not kept, nothing is cropped); each stage's map
average-pooled with a fixed kernel to a small grid and flattened:

=======  ===================  =============  =============
stage    map at 224 px        kernel/stride  features
=======  ===================  =============  =============
res2     256 x 56 x 56        16 / 8         256 x 6 x 6 = 9216
res3     512 x 28 x 28        13 / 5         512 x 4 x 4 = 8192
res4     1024 x 14 x 14       8 / 3          1024 x 3 x 3 = 9216
res5     2048 x 7 x 7         6 / 1          2048 x 2 x 2 = 8192
=======  ===================  =============  =============

The kernels are made for 224 px inputs. At another input size (e.g. the 96 px ``demo_cls``) a
stage is pooled adaptively to the same grid instead (OpenSelfSup's "adaptive" pooling), so that
the dimensions stay those of the table; :func:`stage_pooling_mode` says which was used.
"""

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

__all__ = [
    "POOL_KERNELS",
    "POOL_GRID",
    "POOL_INPUT_SIZE",
    "squash_transform",
    "pool_stage",
    "stage_pooling_mode",
    "MultiStagePooling",
]

POOL_INPUT_SIZE = 224
# stage -> (kernel, stride) of the average pooling at 224 px, and the grid it produces.
POOL_KERNELS = {"res2": (16, 8), "res3": (13, 5), "res4": (8, 3), "res5": (6, 1)}
POOL_GRID = {"res2": 6, "res3": 4, "res4": 3, "res5": 2}
_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def squash_transform(resize: int = 256, size: int = POOL_INPUT_SIZE):
    """Shorter side to ``resize``, then the whole image to ``size`` x ``size`` (no crop)."""
    return v2.Compose([v2.Resize(resize, antialias=True), v2.Resize((size, size), antialias=True)])


def _fixed_kernel_fits(stage: str, height: int, width: int) -> bool:
    side = POOL_INPUT_SIZE // _STRIDES[stage]
    return (height, width) == (side, side)


def stage_pooling_mode(size: int) -> str:
    """ "fixed kernels" at the 224 px the kernels were made for, else "adaptive"."""
    return "fixed kernels" if size == POOL_INPUT_SIZE else "adaptive"


def pool_stage(x: torch.Tensor, stage: str) -> torch.Tensor:
    """
    Args:
        x: (N, C, H, W) map of ``stage``.
    Returns:
        (N, C * g * g) with g = ``POOL_GRID[stage]``: the fixed kernel when the map has its
        224 px size, else adaptive average pooling to g x g.
    """
    if _fixed_kernel_fits(stage, *x.shape[-2:]):
        kernel, stride = POOL_KERNELS[stage]
        pooled = F.avg_pool2d(x, kernel, stride)
    else:
        pooled = F.adaptive_avg_pool2d(x, POOL_GRID[stage])
    return pooled.flatten(1)


class MultiStagePooling:
    """The ``forward`` of a feature extraction: images -> {stage: (N, C * g * g)}."""

    def __init__(self, stages: Sequence[str]):
        unknown = [s for s in stages if s not in POOL_KERNELS]
        if unknown:
            raise ValueError(f"No SVM pooling for stage(s) {unknown}; choose from {POOL_KERNELS}.")
        self.stages = tuple(stages)

    def __call__(self, encoder, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(N, 3, H, W) uint8 RGB through ``encoder``'s stages."""
        maps = encoder.feature_maps(encoder.preprocess(images), self.stages)
        return {s: pool_stage(maps[s], s) for s in self.stages}
