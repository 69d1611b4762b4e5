"""DetCo's local views: a shuffled 3x3 jigsaw of patches cut from one augmented crop.

DetCo Sec. 3.4 (following PIRL, Misra & van der Maaten 2020): crop a random region covering at
least 60% of the image, resize it to 255x255, apply the global views' flip, colour jitter and
blur, cut it into a 3x3 grid of 85x85 cells, take a random 64x64 crop inside every cell (so
that neighbouring patches do not share a border) and shuffle the 9 patches.
"""
from typing import Dict, Tuple

import torch
from detectron2.config import configurable
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from .augmentation import build_photometric_augmentation, photometric_args_from_config
from .mapper import PRETRAIN_MAPPER_REGISTRY, MoCoV2Mapper

__all__ = ["JigsawSampler", "JigsawMapper"]


class JigsawSampler:
    """
    Turns a (3, H, W) uint8 image into a set of G*G shuffled (3, P, P) uint8 patches.
    """

    @configurable
    def __init__(
        self,
        *,
        photometric,
        grid: int = 3,
        cell_size: int = 85,
        patch_size: int = 64,
        crop_scale: Tuple[float, float] = (0.6, 1.0),
        crop_ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        flip_prob: float = 0.5,
    ):
        """
        Args:
            photometric: callable on a (3, S, S) uint8 tensor, S = grid * cell_size: the
                global views' colour jitter / grayscale / blur (same parameters, drawn anew).
            grid: G, cells per side.
            cell_size: side of a cell; the crop is resized to G * cell_size (DetCo: 255).
            patch_size: P, side of the random crop inside each cell (DetCo: 64).
            crop_scale: area fraction range of the random crop (DetCo: at least 60%).
            crop_ratio: aspect (w/h) range of the random crop, log-uniform.
            flip_prob: probability of a horizontal flip of the crop.
        """
        assert patch_size <= cell_size, f"patch {patch_size} does not fit in cell {cell_size}"
        self.photometric = photometric
        self.grid = grid
        self.cell_size = cell_size
        self.patch_size = patch_size
        self.crop_scale = list(crop_scale)
        self.crop_ratio = list(crop_ratio)
        self.flip_prob = flip_prob

    @classmethod
    def from_config(cls, cfg):
        j = cfg.INPUT.PRETRAIN.JIGSAW
        # Photometric parameters of the global views; the blur kernel scales with the crop side.
        photometric = photometric_args_from_config(cfg, j.GRID * j.CELL_SIZE)
        return {
            "photometric": build_photometric_augmentation(**photometric),
            "grid": j.GRID,
            "cell_size": j.CELL_SIZE,
            "patch_size": j.PATCH_SIZE,
            "crop_scale": tuple(j.CROP_SCALE),
            # Choice: the paper gives no aspect range; PIRL-style RandomResizedCrop, the global
            # views' range (3/4, 4/3).
            "crop_ratio": tuple(cfg.INPUT.PRETRAIN.CROP_RATIO),
            "flip_prob": cfg.INPUT.PRETRAIN.FLIP_PROB,
        }

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def sample(self, image: torch.Tensor) -> Dict:
        """
        Args:
            image: (3, H, W) uint8.
        Returns:
            dict with
              "patches": (G*G, 3, P, P) uint8, shuffled;
              "cells": (G*G,) raster index (row * G + col) of the cell each patch comes from;
              "offsets": (G*G, 2) (y, x) of each patch inside its cell;
              "crop_box": (top, left, height, width) of the crop in ``image``;
              "flipped": whether the crop was flipped (before it was cut into cells).
        """
        side = self.grid * self.cell_size
        box = RandomResizedCrop.get_params(image, self.crop_scale, self.crop_ratio)
        crop = TF.resized_crop(image, *box, size=[side, side], antialias=True)
        crop = self.photometric(crop)
        flipped = bool(torch.rand(()) < self.flip_prob)
        if flipped:
            crop = crop.flip(-1)
        # (3, S, S) -> (G*G, 3, cell, cell) in raster order.
        g, c = self.grid, self.cell_size
        cells = crop.reshape(3, g, c, g, c).permute(1, 3, 0, 2, 4).reshape(g * g, 3, c, c)
        # One random P x P window per cell, gathered in a single indexing operation.
        offsets = torch.randint(0, c - self.patch_size + 1, (g * g, 2))
        span = torch.arange(self.patch_size)
        rows = (offsets[:, 0, None] + span)[:, None, :, None]  # (G*G, 1, P, 1)
        cols = (offsets[:, 1, None] + span)[:, None, None, :]  # (G*G, 1, 1, P)
        index = torch.arange(g * g)[:, None, None, None]
        patches = cells[index, torch.arange(3)[None, :, None, None], rows, cols]
        order = torch.randperm(g * g)
        return {
            "patches": patches[order].contiguous(),
            "cells": order,
            "offsets": offsets[order],
            "crop_box": box,
            "flipped": flipped,
        }

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 -> (G*G, 3, P, P) uint8 shuffled patches."""
        return self.sample(image)["patches"]


@PRETRAIN_MAPPER_REGISTRY.register()
class JigsawMapper(MoCoV2Mapper):
    """
    DetCo's inputs: the two MoCo v2 global views ``view_q``, ``view_k`` (3, S, S) and two
    independently sampled jigsaw patch sets ``patches_q``, ``patches_k`` (G*G, 3, P, P), all
    uint8 RGB. RandAugment (``INPUT.PRETRAIN.RANDAUGMENT_OPS``) affects the global views only,
    as in the paper's "AA" variant.
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
        views["patches_q"] = self.jigsaw(image)
        views["patches_k"] = self.jigsaw(image)
        return views

