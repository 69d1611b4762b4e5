"""Dataset mappers that turn one unlabeled image record into the views a method trains on.

A mapper decodes the image robustly (see :mod:`.reading`), then ``make_views`` builds the
method's inputs as uint8 (3, H, W) RGB tensors; the model normalises them. Undecodable images
make the mapper return ``None``: detectron2's ``MapDataset`` then retries with another random
index, so an epoch has no hole, and the number skipped is reported with the next good record
(``"num_skipped"``) so the trainer can log a total across loader workers and ranks.
"""
import logging
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.utils.registry import Registry

from .augmentation import PhotometricAugmentation, build_view_crop, photometric_on_device
from .reading import UnreadableImageError, read_rgb_image

__all__ = [
    "PRETRAIN_MAPPER_REGISTRY",
    "PretrainDatasetMapper",
    "MoCoV2Mapper",
    "build_pretrain_mapper",
]

PRETRAIN_MAPPER_REGISTRY = Registry("PRETRAIN_MAPPER")
PRETRAIN_MAPPER_REGISTRY.__doc__ = """
Registry for pretraining dataset mappers, selected by ``cfg.INPUT.PRETRAIN.MAPPER``.
A mapper is built as ``cls(cfg, dataset_dicts)`` and called on one dataset record.
"""

logger = logging.getLogger(__name__)


class PretrainDatasetMapper:
    """
    Base class: robust decoding and skip accounting. Subclasses implement :meth:`make_views`.
    """

    @configurable
    def __init__(
        self,
        *,
        min_image_size: int = 16,
        max_decode_size: int = 0,
        max_consecutive_failures: int = 100,
    ):
        """
        Args:
            min_image_size: images with a shorter side below this are skipped.
            max_decode_size: if > 0, cap the decoded shorter side (see ``read_rgb_image``).
            max_consecutive_failures: raise after this many unreadable images in a row,
                because then the data, not a few files, is broken.
        """
        self.min_image_size = min_image_size
        self.max_decode_size = max_decode_size
        self.max_consecutive_failures = max_consecutive_failures
        self._pending_skips = 0  # per loader worker: skipped since the last good record
        self._total_skips = 0

    @classmethod
    def from_config(cls, cfg, dataset_dicts: Optional[List[Dict]] = None):
        p = cfg.INPUT.PRETRAIN
        return {
            "min_image_size": p.MIN_IMAGE_SIZE,
            "max_decode_size": p.MAX_DECODE_SIZE,
            "max_consecutive_failures": p.MAX_CONSECUTIVE_FAILURES,
        }

    def read(self, file_name: str) -> Optional[torch.Tensor]:
        """Decode ``file_name`` to (3, H, W) uint8 RGB, or count it as skipped and return None."""
        try:
            image = read_rgb_image(file_name, self.min_image_size, self.max_decode_size)
        except UnreadableImageError as e:
            self._pending_skips += 1
            self._total_skips += 1
            if self._total_skips <= 20 or self._total_skips % 1000 == 0:
                logger.warning(f"Skipping unreadable image ({self._total_skips} so far): {e}")
            if self._pending_skips >= self.max_consecutive_failures:
                raise RuntimeError(
                    f"{self._pending_skips} unreadable images in a row (last: {e}). "
                    "Check the dataset paths and files; INPUT.PRETRAIN.MAX_CONSECUTIVE_FAILURES "
                    "sets this limit."
                ) from e
            return None
        return image

    def __call__(self, dataset_dict: Dict) -> Optional[Dict]:
        image = self.read(dataset_dict["file_name"])
        if image is None:
            return None
        out = self.make_views(image, dataset_dict)
        out["image_id"] = dataset_dict.get("image_id")
        out["num_skipped"], self._pending_skips = self._pending_skips, 0
        return out

    def make_views(self, image: torch.Tensor, dataset_dict: Dict) -> Dict:
        """
        Args:
            image: (3, H, W) uint8 RGB.
        Returns:
            dict of the method's inputs.
        """
        raise NotImplementedError


@PRETRAIN_MAPPER_REGISTRY.register()
class MoCoV2Mapper(PretrainDatasetMapper):
    """
    Two independently augmented views, ``view_q`` and ``view_k``: (3, S, S) uint8 each. The
    crop always happens here; the photometric part too unless it runs on the training device
    (``INPUT.PRETRAIN.AUGMENT_ON``, see :mod:`.augmentation`).
    """

    @configurable
    def __init__(self, *, crop, photometric: Optional[PhotometricAugmentation], **kwargs):
        """
        Args:
            crop: (3, H, W) uint8 -> (3, S, S) uint8 RandomResizedCrop.
            photometric: applied to each view here; None when the model applies it.
            kwargs: see :class:`PretrainDatasetMapper`.
        """
        super().__init__(**kwargs)
        self.crop = crop
        self.photometric = photometric

    @classmethod
    def from_config(cls, cfg, dataset_dicts=None):
        ret = super().from_config(cfg, dataset_dicts)
        ret["crop"] = build_view_crop(cfg)
        ret["photometric"] = (
            None if photometric_on_device(cfg) else PhotometricAugmentation(cfg, randaugment=True)
        )
        return ret

    def view(self, image: torch.Tensor) -> torch.Tensor:
        view = self.crop(image)
        if self.photometric is not None:
            view, _ = self.photometric.augment_one(view)
        return view

    def make_views(self, image, dataset_dict):
        return {"view_q": self.view(image), "view_k": self.view(image)}


def build_pretrain_mapper(cfg, dataset_dicts: Optional[List[Dict]] = None):
    """Build the mapper named by ``cfg.INPUT.PRETRAIN.MAPPER``."""
    return PRETRAIN_MAPPER_REGISTRY.get(cfg.INPUT.PRETRAIN.MAPPER)(cfg, dataset_dicts)
