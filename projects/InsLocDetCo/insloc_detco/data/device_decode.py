"""JPEG decoding and cropping on the training device (``INPUT.PRETRAIN.DECODE_ON``).

With ``DECODE_ON: device`` a loader worker does not decode a JPEG: it reads the file's bytes
and header (:func:`~.reading.read_image_for_device`), draws every view's crop box from the size
with the same code as the loader placement (:func:`~.augmentation.draw_crop_box`), and ships
bytes and boxes (:class:`DeviceCrop`). The batch's files travel as one byte tensor
(:class:`EncodedImages`, packed by :func:`pack_encoded` in the worker). The training process
(:func:`decode_views`) decodes them with one ``torchvision.io.decode_jpeg`` call (batched nvjpeg
on CUDA; libjpeg-turbo on the CPU, which the tests use), cuts and resizes every view with the
loader's own :func:`~.augmentation.apply_crop_box` (in float32, rounded to uint8 once per
batch), and puts the (N, 3, S, S) uint8 views into the batch, where the model's ``preprocess``
finds them on its device; the photometric augmentation then runs as with loader decoding.

Files the device should not decode (other formats, grayscale, CMYK, progressive, EXIF-rotated,
truncated-looking JPEGs) are decoded and cropped in the worker as usual, and their views are
shipped as pixels and merged into the batch here; unreadable ones are skipped and counted in
the worker as always. A file that passed the header checks but fails to decode on the device
(corrupt entropy-coded data) is decoded again by libjpeg-turbo on the CPU here; if that fails
too, it is counted as skipped and its sample takes the views of another sample of the batch.

Covered: the views made by a RandomResizedCrop of the whole image (MoCo v2, DetCo's global
views and its 255 px jigsaw crops). Not covered: InsLoc's copy-paste composites (see
docs/SPEED.md).
"""

import logging
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from .augmentation import apply_crop_box, photometric_on_device

__all__ = [
    "DECODE_PLACEMENTS",
    "decode_on_device",
    "DeviceCrop",
    "EncodedImages",
    "pack_encoded",
    "decode_views",
    "cut_views",
]

DECODE_PLACEMENTS = ("loader", "device", "auto")
ENCODED = "encoded"  # a sample's (L,) uint8 JPEG bytes
CROPS = "crops"  # a sample's {view key: (6,) crop spec}

logger = logging.getLogger(__name__)


def decode_on_device(cfg, supported: bool) -> bool:
    """
    Whether ``cfg`` decodes JPEGs on the training device (``INPUT.PRETRAIN.DECODE_ON``).

    Args:
        supported: whether the method's mapper can leave its crops to the device.
    """
    where = cfg.INPUT.PRETRAIN.DECODE_ON
    if where not in DECODE_PLACEMENTS:
        raise ValueError(f"INPUT.PRETRAIN.DECODE_ON must be one of {DECODE_PLACEMENTS}: {where}")
    if where == "loader":
        return False
    possible = supported and photometric_on_device(cfg)
    if where == "auto":
        return possible and cfg.MODEL.DEVICE.startswith("cuda")
    if not supported:
        raise ValueError(
            f"INPUT.PRETRAIN.DECODE_ON=device is not implemented for {cfg.INPUT.PRETRAIN.MAPPER}"
            " (MoCoV2Mapper and JigsawMapper have it): use 'loader' or 'auto'."
        )
    if not possible:
        raise ValueError(
            "INPUT.PRETRAIN.DECODE_ON=device needs the photometric augmentation on the device "
            "too (the loader has no pixels to augment): set INPUT.PRETRAIN.AUGMENT_ON=device."
        )
    return True


class DeviceCrop(NamedTuple):
    """A view the training device cuts: ``box`` (top, left, height, width) in the decoded
    image, resized to ``size`` (height, width)."""

    box: Tuple[int, int, int, int]
    size: Tuple[int, int]

    def as_tensor(self) -> torch.Tensor:
        """(6,) int64: top, left, height, width, output height, output width."""
        return torch.tensor([*self.box, *self.size], dtype=torch.int64)


class EncodedImages:
    """
    The device-decoded part of a batch of N samples, M of them JPEG files.

    Attributes:
        data: (L,) uint8, the M files concatenated; ``lengths``: (M,) int64.
        index: (M,) int64, the samples' positions in the batch.
        crops: {view key: (M, 6) int64 crop specs (see :meth:`DeviceCrop.as_tensor`)}.
        pixels: {view key: (N - M, 3, h, w) uint8}, the views that the loader decoded and
            cut for the other samples, at positions ``pixel_index`` (N - M,).
    """

    def __init__(self, data, lengths, index, crops, pixels, pixel_index):
        self.data, self.lengths, self.index = data, lengths, index
        self.crops: Dict[str, torch.Tensor] = crops
        self.pixels: Dict[str, torch.Tensor] = pixels
        self.pixel_index = pixel_index

    def files(self) -> List[torch.Tensor]:
        """The M files, as (L_i,) uint8 views of :attr:`data`."""
        return list(torch.split(self.data, self.lengths.tolist()))

    def pin_memory(self) -> "EncodedImages":
        # The files are not pinned: nvjpeg copies them through its own pinned buffers.
        self.pixels = {k: v.pin_memory() for k, v in self.pixels.items()}
        return self


def pack_encoded(samples: List[Dict]) -> Optional[EncodedImages]:
    """
    In the loader worker: move the JPEG bytes and crop specs of the samples that have them,
    and the loader-cut views of the others, out of ``samples`` into one :class:`EncodedImages`
    (None, and ``samples`` untouched, if no sample has a file for the device).
    """
    coded = [i for i, s in enumerate(samples) if ENCODED in s]
    if not coded:
        return None
    keys = list(samples[coded[0]][CROPS])
    others = [i for i in range(len(samples)) if i not in set(coded)]
    files = [samples[i].pop(ENCODED) for i in coded]
    crops = [samples[i].pop(CROPS) for i in coded]
    return EncodedImages(
        data=torch.cat(files),
        lengths=torch.tensor([len(f) for f in files], dtype=torch.int64),
        index=torch.tensor(coded, dtype=torch.int64),
        crops={k: torch.stack([c[k] for c in crops]) for k in keys},
        pixels={k: torch.stack([samples[i].pop(k) for i in others]) for k in keys if others},
        pixel_index=torch.tensor(others, dtype=torch.int64),
    )


def decode_views(batch, device) -> int:
    """
    In the training process: decode ``batch.encoded`` on ``device`` and put every view key's
    (N, 3, h, w) uint8 views into ``batch.tensors`` (a :class:`~.batch.PretrainBatch`).

    Returns:
        the number of files that could not be decoded (counted as skipped images).
    """
    enc = batch.encoded
    if enc is None:
        return 0
    device = torch.device(device)
    images = _decode_files(enc.files(), device)
    ok = [j for j, image in enumerate(images) if image is not None]
    failed = [j for j, image in enumerate(images) if image is None]
    if not ok and not len(enc.pixel_index):
        raise RuntimeError("No image of the batch could be decoded (see the warnings above).")
    images = [image.float() if image is not None else None for image in images]
    for key, crops in enc.crops.items():
        parts = []
        if ok:
            parts.append((cut_views(images, crops, ok), enc.index[ok]))
        if key in enc.pixels:
            parts.append((enc.pixels[key], enc.pixel_index))
        views = _assemble(len(batch), parts, device)
        donor = enc.index[ok[0]] if ok else enc.pixel_index[0]
        for j in failed:  # the sample takes another one's views
            views[enc.index[j]] = views[donor]
        batch.tensors[key] = views
    batch.encoded = None
    batch.refresh_views()
    return len(failed)


def cut_views(
    images: List[Optional[torch.Tensor]], crops: torch.Tensor, rows: List[int]
) -> torch.Tensor:
    """
    Args:
        images: M (3, H_i, W_i) float images (None where undecodable).
        crops: (M, 6) crop specs (see :meth:`DeviceCrop.as_tensor`).
        rows: which of the M to cut.
    Returns:
        (len(rows), 3, h, w) uint8 views, one per row, resized as the loader does.
    """
    specs = crops.tolist()
    cut = torch.stack([apply_crop_box(images[j], specs[j][:4], specs[j][4:]) for j in rows])
    return cut.round_().clamp_(0, 255).to(torch.uint8)


def _decode_files(files: List[torch.Tensor], device: torch.device) -> List[Optional[torch.Tensor]]:
    """(3, H, W) uint8 RGB images on ``device``, None where a file cannot be decoded."""
    try:
        return decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass  # one bad file fails the whole batched call: decode one by one
    return [_decode_one(f, device) for f in files]


def _decode_one(data: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
    for where in (device, torch.device("cpu")):  # libjpeg-turbo decodes what nvjpeg refuses
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=where).to(device)
        except RuntimeError as e:
            reason = e
    logger.warning(f"Skipping an undecodable JPEG ({len(data)} bytes): {reason}")
    return None


def _assemble(n: int, parts: List[Tuple[torch.Tensor, torch.Tensor]], device) -> torch.Tensor:
    """
    Args:
        parts: (K_i, 3, h, w) views and their (K_i,) positions in the batch.
    Returns:
        (N, 3, h, w) on ``device``; rows that no part fills are left uninitialised.
    """
    parts = [(views, index) for views, index in parts if len(index)]
    views, index = parts[0]
    if len(parts) == 1 and len(index) == n:
        return views.to(device)  # every sample cut here, in batch order
    out = torch.empty((n, *views.shape[1:]), dtype=views.dtype, device=device)
    for views, index in parts:
        out[index.to(device)] = views.to(device, non_blocking=True)
    return out
