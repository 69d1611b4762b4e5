"""Dataset mappers that turn one unlabeled image record into the views a method trains on.

A mapper decodes the image robustly (see :mod:`.reading`), then ``make_views`` builds the
method's inputs as uint8 (3, H, W) RGB tensors; the model normalises them. With
``INPUT.PRETRAIN.DECODE_ON: device`` (mappers with ``SUPPORTS_DEVICE_DECODING``) a JPEG the
device can decode is not decoded here: ``make_views`` gets an :class:`~.reading.EncodedJpeg`
(bytes and size), returns :class:`~.device_decode.DeviceCrop` boxes instead of its views, and
the training process cuts them (see :mod:`.device_decode`).

An undecodable image is replaced by a random readable image of the data set, drawn by the
mapper itself (so an epoch has no hole), and the number skipped is reported with the record
(``"num_skipped"``) so the trainer can log a total across loader workers and ranks.

When is the data, not a few files, broken? Each loader worker remembers the files it found
unreadable and never draws them again. It aborts with :class:`UnreadableDatasetError` when

* the first ``max_consecutive_failures`` images it tried were all unreadable (no image at all
  could be read: wrong paths, a dead mount, a corpus of junk); or
* every file of the data set has been found unreadable (a small data set, or a mount that died
  during training).

Once one image has been read, a run of failures alone never aborts: a corpus in which any
fraction is readable trains, and what it skips is counted. The first rule can fire on a usable
corpus only by chance: with a readable fraction f, each worker's first K draws all fail with
probability about (1 - f)^K, below 2e-9 for f = 2 % at the default K = 1000.
"""

import logging
from typing import Collection, Dict, List, Optional, Sequence, Tuple, Union

import torch
from detectron2.config import configurable
from detectron2.data.common import DatasetFromList
from detectron2.utils.registry import Registry

from .augmentation import (
    PhotometricAugmentation,
    apply_crop_box,
    build_view_crop,
    draw_crop_box,
    photometric_on_device,
)
from .device_decode import CROPS, ENCODED, DeviceCrop, decode_on_device
from .reading import (
    EncodedJpeg,
    ImageTooLargeError,
    UnreadableImageError,
    read_image_for_device,
    read_rgb_image,
)

__all__ = [
    "PRETRAIN_MAPPER_REGISTRY",
    "UnreadableDatasetError",
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


class UnreadableDatasetError(RuntimeError):
    """The data set, not a few files, is unreadable (see the module docstring)."""


class PretrainDatasetMapper:
    """
    Base class: robust decoding, replacement of unreadable images and skip accounting.
    Subclasses implement :meth:`make_views`.
    """

    # Tries to draw an image other than the excluded ones before accepting a repeat: with
    # fewer readable files than exclusions, a repeat is the only choice.
    _EXCLUDE_TRIES = 32
    _NUM_EXAMPLES = 5  # unreadable files quoted in the abort message
    # Whether make_views can return DeviceCrop boxes for an EncodedJpeg (DECODE_ON: device).
    SUPPORTS_DEVICE_DECODING = False

    @configurable
    def __init__(
        self,
        *,
        min_image_size: int = 16,
        max_decode_size: int = 0,
        max_image_pixels: int = 0,
        max_consecutive_failures: int = 1000,
        file_names: Optional[Sequence[str]] = None,
        device_decoding: bool = False,
    ):
        """
        Args:
            min_image_size: images with a shorter side below this are skipped.
            max_decode_size: if > 0, cap the decoded shorter side (see ``read_rgb_image``).
            max_image_pixels: if > 0, images that would decode to more pixels are skipped,
                from their header (see ``read_rgb_image``).
            max_consecutive_failures: abort if this many images are unreadable before any
                could be read (see the module docstring).
            file_names: the data set's files, to draw replacements (and InsLoc's backgrounds)
                from. Without them an unreadable record makes the mapper return None, and
                detectron2's ``MapDataset`` retries another index.
            device_decoding: leave the JPEGs that the training device can decode undecoded
                (see the module docstring); only for mappers with ``SUPPORTS_DEVICE_DECODING``.
        """
        assert not device_decoding or self.SUPPORTS_DEVICE_DECODING, type(self).__name__
        self.device_decoding = device_decoding
        self.min_image_size = min_image_size
        self.max_decode_size = max_decode_size
        self.max_image_pixels = max_image_pixels
        self.max_consecutive_failures = max_consecutive_failures
        self.file_names = file_names
        # Per loader worker (each has its own copy):
        self._pending_skips = 0  # skipped since the last returned record
        self._total_skips = 0
        self._num_read = 0  # images read successfully
        self._unreadable = set()  # indices into file_names found unreadable: never drawn again
        self._examples = []  # the first few failures, quoted if the data set is broken

    @classmethod
    def from_config(cls, cfg, dataset_dicts: Optional[List[Dict]] = None):
        p = cfg.INPUT.PRETRAIN
        ret = {
            "min_image_size": p.MIN_IMAGE_SIZE,
            "max_decode_size": p.MAX_DECODE_SIZE,
            "max_image_pixels": p.MAX_IMAGE_PIXELS,
            "max_consecutive_failures": p.MAX_CONSECUTIVE_FAILURES,
            "device_decoding": decode_on_device(cfg, cls.SUPPORTS_DEVICE_DECODING),
        }
        if dataset_dicts:
            # Serialised like detectron2's own record list, so that loader workers do not copy
            # a million Python strings on access (copy-on-write through reference counts).
            files = [d["file_name"] for d in dataset_dicts]
            ret["file_names"] = DatasetFromList(files, copy=False, serialize=True)
        return ret

    def read(self, file_name: str) -> Union[torch.Tensor, EncodedJpeg, None]:
        """Decode ``file_name`` to (3, H, W) uint8 RGB (or, with device decoding, return its
        :class:`EncodedJpeg` if it is one the device decodes), or count it as skipped and
        return None."""
        read = read_image_for_device if self.device_decoding else read_rgb_image
        try:
            image = read(
                file_name, self.min_image_size, self.max_decode_size, self.max_image_pixels
            )
        except UnreadableImageError as e:
            self._pending_skips += 1
            self._total_skips += 1
            reason = str(e)
            if isinstance(e, ImageTooLargeError):
                reason += " (raise INPUT.PRETRAIN.MAX_IMAGE_PIXELS to train on such images)"
            if len(self._examples) < self._NUM_EXAMPLES and reason not in self._examples:
                self._examples.append(reason)
            if self._total_skips <= 20 or self._total_skips % 1000 == 0:
                logger.warning(f"Skipping unreadable image ({self._total_skips} so far): {reason}")
            if self._num_read == 0 and self._total_skips >= self.max_consecutive_failures:
                raise self._broken(
                    f"the first {self._total_skips} images tried were all unreadable "
                    "(INPUT.PRETRAIN.MAX_CONSECUTIVE_FAILURES sets how many are tried)"
                ) from e
            return None
        self._num_read += 1
        return image

    def read_random(
        self, exclude: Collection[str] = ()
    ) -> Tuple[int, str, Union[torch.Tensor, EncodedJpeg]]:
        """
        Draw a random readable image of the data set, not one of ``exclude`` unless too few
        readable files remain. Files found unreadable are remembered and never drawn again.

        Returns:
            its index in ``file_names``, its file name and the (3, H, W) uint8 image (or
            :class:`EncodedJpeg`, as :meth:`read` returns).
        Raises:
            UnreadableDatasetError: every file of the data set is unreadable.
        """
        num, excluded = len(self.file_names), 0
        while True:
            if len(self._unreadable) >= num:
                raise self._broken(f"every file of the data set ({num}) is unreadable")
            index = int(torch.randint(num, ()))  # worker-seeded global generator
            if index in self._unreadable:
                continue
            name = self.file_names[index]
            if name in exclude and excluded < self._EXCLUDE_TRIES:
                excluded += 1
                continue
            image = self.read(name)
            if image is not None:
                return index, name, image
            self._unreadable.add(index)

    def _broken(self, reason: str) -> UnreadableDatasetError:
        examples = "\n  ".join(self._examples)
        return UnreadableDatasetError(
            f"No usable image: {reason}. The data set, not a few files, is broken: check "
            f"DATASETS.TRAIN and the files. Examples:\n  {examples}"
        )

    def __call__(self, dataset_dict: Dict) -> Optional[Dict]:
        image = self.read(dataset_dict["file_name"])
        if image is None:
            if self.file_names is None:
                return None
            index, name, image = self.read_random()
            dataset_dict = {"file_name": name, "image_id": index}
        out = self.make_views(image, dataset_dict)
        if isinstance(image, EncodedJpeg):  # the training device decodes it and cuts the views
            crops = {k: v for k, v in out.items() if isinstance(v, DeviceCrop)}
            out = {k: v for k, v in out.items() if k not in crops}
            out[ENCODED] = image.data
            out[CROPS] = {k: v.as_tensor() for k, v in crops.items()}
        out["image_id"] = dataset_dict.get("image_id")
        out["num_skipped"], self._pending_skips = self._pending_skips, 0
        return out

    def make_views(self, image: Union[torch.Tensor, EncodedJpeg], dataset_dict: Dict) -> Dict:
        """
        Args:
            image: (3, H, W) uint8 RGB, or an :class:`EncodedJpeg` (device decoding only).
        Returns:
            dict of the method's inputs; for an :class:`EncodedJpeg`, the views the device cuts
            are :class:`DeviceCrop` s.
        """
        raise NotImplementedError


@PRETRAIN_MAPPER_REGISTRY.register()
class MoCoV2Mapper(PretrainDatasetMapper):
    """
    Two independently augmented views, ``view_q`` and ``view_k``: (3, S, S) uint8 each. The
    crop is drawn here and applied here, or on the training device for a JPEG decoded there
    (``INPUT.PRETRAIN.DECODE_ON``); the photometric part runs here unless it runs on the
    training device (``INPUT.PRETRAIN.AUGMENT_ON``, see :mod:`.augmentation`).
    """

    SUPPORTS_DEVICE_DECODING = True

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

    def view(self, image: Union[torch.Tensor, EncodedJpeg]) -> Union[torch.Tensor, DeviceCrop]:
        box = draw_crop_box(self.crop, *image.shape[-2:])
        if isinstance(image, EncodedJpeg):
            return DeviceCrop(box, tuple(self.crop.size))
        view = apply_crop_box(image, box, self.crop.size)
        if self.photometric is not None:
            view, _ = self.photometric.augment_one(view)
        return view

    def make_views(self, image, dataset_dict):
        return {"view_q": self.view(image), "view_k": self.view(image)}


def build_pretrain_mapper(cfg, dataset_dicts: Optional[List[Dict]] = None):
    """Build the mapper named by ``cfg.INPUT.PRETRAIN.MAPPER``."""
    return PRETRAIN_MAPPER_REGISTRY.get(cfg.INPUT.PRETRAIN.MAPPER)(cfg, dataset_dicts)
