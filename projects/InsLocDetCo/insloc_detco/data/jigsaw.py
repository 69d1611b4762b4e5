"""DetCo's local views: a shuffled 3x3 jigsaw of patches cut from one augmented crop.

DetCo Sec. 3.4 (following PIRL, Misra & van der Maaten 2020): crop a random region covering at
least 60% of the image, resize it to 255x255, apply the global views' flip, colour jitter and
blur, cut it into a 3x3 grid of 85x85 cells, take a random 64x64 crop inside every cell (so
that neighbouring patches do not share a border) and shuffle the 9 patches.

The geometric part (:meth:`JigsawSampler.draw`: the 255 px crop's box, the patch offsets and
the shuffle) is drawn in the loader and the crop is cut there (:meth:`JigsawSampler.crop`) or,
for a JPEG decoded on the training device, there (``INPUT.PRETRAIN.DECODE_ON``); the
photometric part runs on the whole crop, in the loader or on the training device
(``INPUT.PRETRAIN.AUGMENT_ON``), before :func:`cut_patches`, so the nine patches of a set
always share one draw of the photometric parameters.
"""

from typing import Dict, Optional, Tuple

import torch
from detectron2.config import configurable
from torchvision.transforms import RandomResizedCrop

from .augmentation import (
    PhotometricAugmentation,
    apply_crop_box,
    photometric_on_device,
    size_stand_in,
)
from .device_decode import DeviceCrop
from .mapper import PRETRAIN_MAPPER_REGISTRY, MoCoV2Mapper
from .reading import EncodedJpeg

__all__ = ["JigsawSampler", "JigsawMapper", "cut_patches"]


def cut_patches(
    crops: torch.Tensor, offsets: torch.Tensor, order: torch.Tensor, grid: int, patch_size: int
) -> torch.Tensor:
    """
    Cut each square crop into ``grid x grid`` cells and take one window per cell.

    Args:
        crops: (N, C, S, S), S = grid * cell size.
        offsets: (N, G*G, 2) (y, x) of the window inside its cell, per output patch.
        order: (N, G*G) raster index (row * G + col) of the cell each output patch comes from.
        grid: G; patch_size: P.
    Returns:
        (N, G*G, C, P, P) patches, in ``order``.
    """
    n, c, s, _ = crops.shape
    cell = s // grid
    span = torch.arange(patch_size, device=crops.device)
    top = (order // grid) * cell + offsets[..., 0]  # (N, G*G) absolute window corners
    left = (order % grid) * cell + offsets[..., 1]
    rows = (top[..., None] + span)[:, :, None, :, None]  # (N, G*G, 1, P, 1)
    cols = (left[..., None] + span)[:, :, None, None, :]  # (N, G*G, 1, 1, P)
    batch = torch.arange(n, device=crops.device)[:, None, None, None, None]
    channel = torch.arange(c, device=crops.device)[None, None, :, None, None]
    return crops[batch, channel, rows, cols]


class JigsawSampler:
    """
    Turns a (3, H, W) uint8 image into a set of G*G shuffled (3, P, P) uint8 patches.
    """

    @configurable
    def __init__(
        self,
        *,
        photometric: Optional[PhotometricAugmentation],
        grid: int = 3,
        cell_size: int = 85,
        patch_size: int = 64,
        crop_scale: Tuple[float, float] = (0.6, 1.0),
        crop_ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    ):
        """
        Args:
            photometric: the global views' colour jitter / grayscale / blur / flip (same
                parameters, drawn anew per crop), applied to the whole G * cell_size crop here
                in the loader; None when it runs on the training device instead.
            grid: G, cells per side.
            cell_size: side of a cell; the crop is resized to G * cell_size (DetCo: 255).
            patch_size: P, side of the random crop inside each cell (DetCo: 64).
            crop_scale: area fraction range of the random crop (DetCo: at least 60%).
            crop_ratio: aspect (w/h) range of the random crop, log-uniform.
        """
        assert patch_size <= cell_size, f"patch {patch_size} does not fit in cell {cell_size}"
        self.photometric = photometric
        self.grid = grid
        self.cell_size = cell_size
        self.patch_size = patch_size
        self.crop_scale = list(crop_scale)
        self.crop_ratio = list(crop_ratio)

    @classmethod
    def from_config(cls, cfg):
        j = cfg.INPUT.PRETRAIN.JIGSAW
        return {
            # The global views' photometric family (without RandAugment, which DetCo's "AA"
            # applies to the global views only).
            "photometric": None if photometric_on_device(cfg) else PhotometricAugmentation(cfg),
            "grid": j.GRID,
            "cell_size": j.CELL_SIZE,
            "patch_size": j.PATCH_SIZE,
            "crop_scale": tuple(j.CROP_SCALE),
            # Choice: the paper gives no aspect range; PIRL-style RandomResizedCrop, the global
            # views' range (3/4, 4/3).
            "crop_ratio": tuple(cfg.INPUT.PRETRAIN.CROP_RATIO),
        }

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def draw(self, height: int, width: int) -> Dict:
        """
        The geometric part, drawn per image from its size.

        Returns:
            dict with
              "crop_box": (top, left, height, width) of the crop in the image;
              "cells": (G*G,) raster index (row * G + col) of the cell each patch comes from,
              a random order (the shuffle);
              "offsets": (G*G, 2) (y, x) of each patch inside its cell.
        """
        box = RandomResizedCrop.get_params(
            size_stand_in(height, width), self.crop_scale, self.crop_ratio
        )
        g = self.grid
        offsets = torch.randint(0, self.cell_size - self.patch_size + 1, (g * g, 2))
        return {"crop_box": box, "cells": torch.randperm(g * g), "offsets": offsets}

    @property
    def crop_size(self) -> Tuple[int, int]:
        """(S, S), S = G * cell_size: the side the crop is resized to."""
        return (self.grid * self.cell_size,) * 2

    def crop(self, image: torch.Tensor) -> Dict:
        """
        :meth:`draw`, then the crop.

        Args:
            image: (3, H, W) uint8.
        Returns:
            :meth:`draw`'s dict and "crop": (3, S, S) uint8, not yet photometrically augmented.
        """
        out = self.draw(*image.shape[-2:])
        out["crop"] = apply_crop_box(image, out["crop_box"], self.crop_size)
        return out

    def cut(self, crops: torch.Tensor, cells: torch.Tensor, offsets: torch.Tensor):
        """Batched :func:`cut_patches` with this sampler's grid: (N, G*G, 3, P, P)."""
        return cut_patches(crops, offsets, cells, self.grid, self.patch_size)

    def sample(self, image: torch.Tensor) -> Dict:
        """
        Loader placement: crop, photometric augmentation, cut.

        Returns:
            :meth:`crop`'s dict with "crop" augmented and "patches": (G*G, 3, P, P) uint8.
        """
        out = self.crop(image)
        if self.photometric is not None:
            out["crop"], _ = self.photometric.augment_one(out["crop"])
        out["patches"] = self.cut(out["crop"][None], out["cells"][None], out["offsets"][None])[0]
        return out

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 -> (G*G, 3, P, P) uint8 shuffled patches."""
        return self.sample(image)["patches"]


@PRETRAIN_MAPPER_REGISTRY.register()
class JigsawMapper(MoCoV2Mapper):
    """
    DetCo's inputs: the two MoCo v2 global views ``view_q``, ``view_k`` (3, S, S) and two
    independently sampled jigsaw patch sets ``patches_q``, ``patches_k`` (G*G, 3, P, P), all
    uint8 RGB. RandAugment (``INPUT.PRETRAIN.RANDAUGMENT_OPS``) affects the global views only,
    as in the paper's "AA" variant. With the photometric augmentation on the training device,
    the patch sets are sent uncut: ``jigsaw_q/k`` (3, G*cell, G*cell) crops with their
    ``cells_q/k`` (G*G,) and ``offsets_q/k`` (G*G, 2), and the model cuts them (``DetCo``);
    for a JPEG decoded on the training device (``INPUT.PRETRAIN.DECODE_ON``) the crops are
    cut there too.
    """

    @configurable
    def __init__(self, *, jigsaw: JigsawSampler, **kwargs):
        """
        Args:
            jigsaw: sampler of one local patch set.
            kwargs: see :class:`MoCoV2Mapper`.
        """
        super().__init__(**kwargs)
        self.jigsaw = jigsaw

    @classmethod
    def from_config(cls, cfg, dataset_dicts=None):
        ret = super().from_config(cfg, dataset_dicts)
        ret["jigsaw"] = JigsawSampler(cfg)
        return ret

    def make_views(self, image, dataset_dict):
        views = super().make_views(image, dataset_dict)
        for side in ("q", "k"):
            if self.jigsaw.photometric is not None:
                views[f"patches_{side}"] = self.jigsaw(image)
            else:  # cut on the training device after the photometric augmentation
                local = self.jigsaw.draw(*image.shape[-2:])
                if isinstance(image, EncodedJpeg):
                    crop = DeviceCrop(local["crop_box"], self.jigsaw.crop_size)
                else:
                    crop = apply_crop_box(image, local["crop_box"], self.jigsaw.crop_size)
                views[f"jigsaw_{side}"] = crop
                views[f"cells_{side}"] = local["cells"]
                views[f"offsets_{side}"] = local["offsets"]
        return views
