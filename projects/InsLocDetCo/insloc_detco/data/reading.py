"""Robust image decoding for unlabeled pretraining data.

Real crawls contain corrupt files, grayscale, CMYK, palette and alpha images, thumbnails and
the occasional huge scan. :func:`read_rgb_image` converts what can be converted and raises
:class:`UnreadableImageError` for the rest (:class:`ImageTooLargeError` for images over the
pixel cap, found from the header before anything is decoded), so that the mapper can skip the
image and count it.

Baseline JPEGs in RGB or grayscale (most of ImageNet and COCO) are decoded by
``torchvision.io.decode_jpeg`` (libjpeg-turbo straight into a (3, H, W) tensor, bit-identical to
Pillow's pixels, about twice as fast: docs/SPEED.md). Everything else, and JPEGs that Pillow's
draft mode shrinks while decoding (``max_size``), goes through Pillow.

:func:`read_image_for_device` (``INPUT.PRETRAIN.DECODE_ON: device``) applies the same checks
from the header and leaves the JPEGs that the training device can decode undecoded
(:class:`EncodedJpeg`, see :mod:`.device_decode`); it decodes the others as above.
"""

import contextlib
import io
import warnings
from typing import NamedTuple, Optional, Union

import numpy as np
import torch
from detectron2.data.detection_utils import _apply_exif_orientation
from detectron2.utils.file_io import PathManager
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "UnreadableImageError",
    "ImageTooLargeError",
    "EncodedJpeg",
    "read_rgb_image",
    "read_image_for_device",
    "jpeg_frame_marker",
]

# Alpha is composited on mid-gray rather than dropped: dropping exposes whatever colour the
# transparent pixels happen to store (often black or noise).
_ALPHA_BACKGROUND = (124, 116, 104)
_EXIF_ORIENTATION = 0x0112
# Start-of-frame markers (SOF0-SOF15 less DHT 0xC4, JPG 0xC8, DAC 0xCC) and those whose
# Huffman-coded sequential scans nvjpeg decodes in one batched call (hardware on A100/H100).
_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_DEVICE_FRAMES = (0xC0, 0xC1)
_EOI_SEARCH = 64  # bytes of the file's tail searched for the EOI marker behind zero padding


class EncodedJpeg(NamedTuple):
    """A JPEG file left for the training device to decode, and its size from the header."""

    data: torch.Tensor  # (L,) uint8, the file's bytes
    height: int
    width: int

    @property
    def shape(self):
        """(3, H, W): the shape of the decoded image, as for a decoded one."""
        return (3, self.height, self.width)


class UnreadableImageError(Exception):
    """The file could not be turned into a usable RGB image."""


class ImageTooLargeError(UnreadableImageError):
    """The image has more pixels than the caller's cap (or Pillow's own bomb limit)."""


def read_rgb_image(
    file_name: str, min_size: int = 1, max_size: int = 0, max_pixels: int = 0
) -> torch.Tensor:
    """
    Decode an image file into an RGB tensor.

    Args:
        file_name: path or URI understood by detectron2's ``PathManager``.
        min_size: images whose shorter side is smaller are rejected.
        max_size: if > 0, images whose shorter side is larger are downscaled to it while
            decoding (JPEG draft mode, then a resize): pretraining crops never need more.
        max_pixels: if > 0, images that would decode to more than this many pixels (width x
            height from the header, after the JPEG draft reduction) are rejected before
            decoding, whatever their format.

    Returns:
        uint8 tensor of shape (3, H, W), RGB, EXIF orientation applied.

    Raises:
        ImageTooLargeError: over ``max_pixels``, or over Pillow's process-wide limit
            (2 x ``PIL.Image.MAX_IMAGE_PIXELS``, checked by ``Image.open`` itself).
        UnreadableImageError: corrupt, truncated, unsupported or too small.
    """
    with _unreadable_on_error(file_name):
        data = _read_bytes(file_name)
        image, full_size = _open_header(data, file_name, max_size, max_pixels)
        return _decode(data, image, full_size, file_name, min_size, max_size)


def read_image_for_device(
    file_name: str, min_size: int = 1, max_size: int = 0, max_pixels: int = 0
) -> Union[EncodedJpeg, torch.Tensor]:
    """
    :func:`read_rgb_image` for ``INPUT.PRETRAIN.DECODE_ON: device``: a JPEG that the training
    device decodes to the same pixels is returned undecoded, everything else decoded here.

    Only the header is parsed. The file goes to the device if it is a baseline (SOF0/SOF1)
    8-bit, 3-component (YCbCr/RGB) JPEG without EXIF rotation, that ends with its EOI marker
    and needs no ``max_size`` reduction; the same size and pixel checks as
    :func:`read_rgb_image` apply first. Grayscale, CMYK, progressive (nvjpeg would decode them
    on the host, in the training thread), EXIF-rotated and truncated-looking JPEGs, and other
    formats, are decoded here exactly as :func:`read_rgb_image` does (so a truncated file is
    skipped as it always was).

    Returns:
        an :class:`EncodedJpeg`, or the (3, H, W) uint8 image.
    Raises:
        as :func:`read_rgb_image`.
    """
    with _unreadable_on_error(file_name):
        data = _read_bytes(file_name)
        image, full_size = _open_header(data, file_name, max_size, max_pixels)
        if _device_decodable(data, image, full_size, max_size):
            w, h = full_size
            _check_min_size(w, h, file_name, min_size)
            return EncodedJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), h, w)
        return _decode(data, image, full_size, file_name, min_size, max_size)


@contextlib.contextmanager
def _unreadable_on_error(file_name: str):
    """Turn whatever a reader raises into :class:`UnreadableImageError` (or a subclass)."""
    try:
        yield
    except UnreadableImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(
            f"{file_name}: {e} (Pillow's process-wide limit, 2 x PIL.Image.MAX_IMAGE_PIXELS)"
        ) from e
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise UnreadableImageError(f"{file_name}: {type(e).__name__}: {e}") from e


def _read_bytes(file_name: str) -> bytes:
    with PathManager.open(file_name, "rb") as f:
        return f.read()


def _open_header(data: bytes, file_name: str, max_size: int, max_pixels: int):
    """
    Open ``data`` lazily (header only) and apply the pixel cap to the size decoding will give.

    Returns:
        the lazily opened PIL image (in draft mode if ``max_size`` shrinks a JPEG) and the
        (width, height) of the full-size image.
    """
    with warnings.catch_warnings():
        # Pillow warns above PIL.Image.MAX_IMAGE_PIXELS; `max_pixels` is what decides.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))  # reads the header only
    full_size = image.size
    if max_size > 0 and image.format == "JPEG":
        image.draft("RGB", (max_size, max_size))
    w, h = image.size  # what decoding gives
    if max_pixels > 0 and w * h > max_pixels:
        raise ImageTooLargeError(
            f"{file_name}: {w}x{h} = {w * h} pixels is over the cap of {max_pixels}"
        )
    return image, full_size


def _decode(data: bytes, image: Image.Image, full_size, file_name, min_size, max_size):
    """Decode a file opened by :func:`_open_header` to a checked (3, H, W) uint8 RGB tensor."""
    if image.format == "JPEG" and image.mode in ("RGB", "L") and image.size == full_size:
        tensor = decode_jpeg(
            torch.frombuffer(bytearray(data), dtype=torch.uint8),
            mode=ImageReadMode.RGB,
            apply_exif_orientation=True,
        )
        return _check_and_cap_size(tensor, file_name, min_size, max_size)
    # Decode now: reading the EXIF of a PNG decodes it too, and detectron2's
    # _apply_exif_orientation swallows that error, which would leave a corrupt image
    # silently black.
    image.load()
    image = _to_rgb(_apply_exif_orientation(image))
    array = np.asarray(image, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    return _check_and_cap_size(tensor, file_name, min_size, max_size)


def _device_decodable(data: bytes, image: Image.Image, full_size, max_size: int) -> bool:
    """Whether the training device may decode ``data`` (see :func:`read_image_for_device`)."""
    if image.format != "JPEG" or image.mode != "RGB" or image.size != full_size:
        return False  # not a JPEG, grayscale or CMYK, or shrunk by draft mode
    if max_size > 0 and min(full_size) > max_size:
        return False
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        return False
    # Trailing zero padding is common and harmless; a missing EOI means a truncated file.
    if not data[-_EOI_SEARCH:].rstrip(b"\x00").endswith(b"\xff\xd9"):
        return False
    return jpeg_frame_marker(data) in _DEVICE_FRAMES


def jpeg_frame_marker(data: bytes) -> Optional[int]:
    """
    The start-of-frame marker of a JPEG stream (0xC0 baseline, 0xC1 extended sequential,
    0xC2 progressive, ...; ITU T.81 Table B.1), found by walking the marker segments from
    SOI without decoding, or None if the stream has none before its scan or is malformed.
    """
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _FRAME_MARKERS:
            return marker
        if marker == 0xDA:  # start of scan: no frame header came first
            return None
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def _check_and_cap_size(image: torch.Tensor, file_name: str, min_size: int, max_size: int):
    """Reject a (3, H, W) image under ``min_size``; shrink one over ``max_size`` (shorter side)."""
    h, w = image.shape[-2:]
    _check_min_size(w, h, file_name, min_size)
    if max_size > 0 and min(w, h) > max_size:
        scale = max_size / min(w, h)
        size = [max(1, round(h * scale)), max(1, round(w * scale))]
        image = TF.resize(image, size, antialias=True)
    return image


def _check_min_size(w: int, h: int, file_name: str, min_size: int):
    if min(w, h) < min_size:
        raise UnreadableImageError(f"{file_name}: {w}x{h} is smaller than {min_size} pixels")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: CMYK, YCbCr, 16-bit and float grayscale, palette, alpha."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # High bit-depth grayscale: rescale the actual range to 8 bits instead of clipping.
        array = np.asarray(image, dtype=np.float32)
        lo, hi = float(array.min()), float(array.max())
        array = (array - lo) * (255.0 / max(hi - lo, 1e-6))
        image = Image.fromarray(array.astype(np.uint8), mode="L")
    return image.convert("RGB")
