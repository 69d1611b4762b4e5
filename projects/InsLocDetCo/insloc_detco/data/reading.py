"""Robust image decoding for unlabeled pretraining data.

Real crawls contain corrupt files, grayscale, CMYK, palette and alpha images, thumbnails and
the occasional huge scan. :func:`read_rgb_image` converts what can be converted and raises
:class:`UnreadableImageError` for the rest (:class:`ImageTooLargeError` for images over the
pixel cap, found from the header before anything is decoded), so that the mapper can skip the
image and count it.

Baseline JPEGs in RGB or grayscale (most of ImageNet and COCO) are decoded by
``torchvision.io.decode_jpeg`` (libjpeg-turbo straight into a (3, H, W) tensor, bit-identical to
Pillow's pixels): 2.0-2.4x Pillow's decode and copy on ImageNet-sized photos, one thread
(``bench/bench_decode.py``: 1,422 vs 705 img/s on an H100 machine's core, 1,800 vs 740 on our
2-core CPU). Everything else, and JPEGs that Pillow's draft mode shrinks while decoding
(``max_size``), goes through Pillow.
"""
import io
import warnings

import numpy as np
import torch
from detectron2.data.detection_utils import _apply_exif_orientation
from detectron2.utils.file_io import PathManager
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

__all__ = ["UnreadableImageError", "ImageTooLargeError", "read_rgb_image"]

# Alpha is composited on mid-gray rather than dropped: dropping exposes whatever colour the
# transparent pixels happen to store (often black or noise).
_ALPHA_BACKGROUND = (124, 116, 104)


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
    try:
        with PathManager.open(file_name, "rb") as f:
            data = f.read()
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
    except UnreadableImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(
            f"{file_name}: {e} (Pillow's process-wide limit, 2 x PIL.Image.MAX_IMAGE_PIXELS)"
        ) from e
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise UnreadableImageError(f"{file_name}: {type(e).__name__}: {e}") from e
    array = np.asarray(image, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    return _check_and_cap_size(tensor, file_name, min_size, max_size)


def _check_and_cap_size(image: torch.Tensor, file_name: str, min_size: int, max_size: int):
    """Reject a (3, H, W) image under ``min_size``; shrink one over ``max_size`` (shorter side)."""
    h, w = image.shape[-2:]
    if min(w, h) < min_size:
        raise UnreadableImageError(f"{file_name}: {w}x{h} is smaller than {min_size} pixels")
    if max_size > 0 and min(w, h) > max_size:
        scale = max_size / min(w, h)
        size = [max(1, round(h * scale)), max(1, round(w * scale))]
        image = TF.resize(image, size, antialias=True)
    return image


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
