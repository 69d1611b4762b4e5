"""What augments a view: the one definition of every method's augmentation.

A view is made in two parts (MoCo v2, Chen et al. 2020; InsLoc and DetCo reuse it):

* **geometric**, per image, in the loader workers: decode, RandomResizedCrop (MoCo v2, DetCo's
  global views), the copy-paste composite (InsLoc), the 255 px jigsaw crop (DetCo). Built here
  by :func:`build_view_crop`; the mappers call it. A crop is drawn from the image's size
  (:func:`draw_crop_box`) and applied (:func:`apply_crop_box`) in the loader, or on the
  training device after decoding there (``INPUT.PRETRAIN.DECODE_ON``, :mod:`.device_decode`).
* **photometric**, per batch: colour jitter (p 0.8, the four factors in a random order per
  sample, as torchvision), random grayscale (p 0.2), Gaussian blur (sigma in [0.1, 2], p 0.5,
  kernel = the odd size nearest to 10% of the view), horizontal flip (boxes flipped too), and
  optionally RandAugment first (DetCo "AA"). :class:`PhotometricAugmentation`, batched with
  per-sample parameters.

``INPUT.PRETRAIN.AUGMENT_ON`` says where the photometric part runs: in the loader workers (the
mapper calls it on a batch of one view) or on the training device (the model calls it in
``preprocess`` on the whole batch). Both run the same module: switching the placement changes
where the code runs, not which code exists. Measured choices are in ``bench/bench_augment.py``.
"""

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from . import photometric as P
from .randaugment import BatchRandAugment

__all__ = [
    "AUGMENT_PLACEMENTS",
    "blur_kernel_size",
    "photometric_on_device",
    "build_view_crop",
    "size_stand_in",
    "draw_crop_box",
    "apply_crop_box",
    "PhotometricAugmentation",
]

AUGMENT_PLACEMENTS = ("auto", "loader", "device")


def blur_kernel_size(view_size: int, frac: float) -> int:
    """The odd kernel side nearest to ``frac * view_size`` (at least 3)."""
    k = int(round(frac * view_size))
    return max(3, k if k % 2 == 1 else k + 1)


def photometric_on_device(cfg) -> bool:
    """Whether ``cfg`` puts the photometric augmentation on the training device."""
    where = cfg.INPUT.PRETRAIN.AUGMENT_ON
    if where not in AUGMENT_PLACEMENTS:
        raise ValueError(f"INPUT.PRETRAIN.AUGMENT_ON must be one of {AUGMENT_PLACEMENTS}: {where}")
    if where == "auto":
        return cfg.MODEL.DEVICE.startswith("cuda")
    return where == "device"


def build_view_crop(cfg, size: Optional[int] = None) -> v2.RandomResizedCrop:
    """MoCo v2's RandomResizedCrop to ``size`` (default ``INPUT.PRETRAIN.CROP_SIZE``)."""
    p = cfg.INPUT.PRETRAIN
    return v2.RandomResizedCrop(
        size or p.CROP_SIZE, scale=tuple(p.CROP_SCALE), ratio=tuple(p.CROP_RATIO), antialias=True
    )


def size_stand_in(height: int, width: int) -> torch.Tensor:
    """A pixel-less (0, H, W) tensor: all that torchvision's crop parameter draws read of an
    image is its size, so crops are drawn from a JPEG header before (or without) decoding."""
    return torch.empty((0, height, width), dtype=torch.uint8)


def draw_crop_box(crop: v2.RandomResizedCrop, height: int, width: int) -> Tuple[int, ...]:
    """``crop``'s random (top, left, height, width) for an image of ``height x width``: its
    own parameter draw, as its ``forward`` makes it."""
    p = crop.make_params([size_stand_in(height, width)])
    return p["top"], p["left"], p["height"], p["width"]


def apply_crop_box(image: torch.Tensor, box: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """Cut ``box`` (top, left, height, width) out of (..., H, W) ``image`` and resize it to
    ``size`` (bilinear, antialiased), on the image's device: ``crop(image)`` is
    ``apply_crop_box(image, draw_crop_box(crop, H, W), crop.size)``."""
    return TF.resized_crop(image, *box, size=list(size), antialias=True)


# Columns of the (N, UNIFORMS) uniform draws that encode one sample's parameters (see
# PhotometricAugmentation.params_from_uniforms).
_JITTER, _ORDER, _FACTORS, _GRAY, _BLUR, _SIGMA, _FLIP = 0, slice(1, 5), slice(5, 9), 9, 10, 11, 12
UNIFORMS = 13


def _where(mask: torch.Tensor, changed: torch.Tensor, unchanged: torch.Tensor) -> torch.Tensor:
    """Per sample: ``changed`` where the (N,) ``mask`` is True, else ``unchanged``."""
    return torch.where(mask.view(-1, *[1] * (changed.dim() - 1)), changed, unchanged)


def _blended_where(
    mask: torch.Tensor, op: Callable, x: torch.Tensor, blended: bool = False
) -> torch.Tensor:
    """
    ``op`` of the samples that drew it (``mask`` (N,)), the others unchanged: computed on the
    whole batch and selected per sample, a fixed-shape blend. The step then never asks the
    device which samples those are (no ``nonzero``, no host sync) and can be compiled and
    captured once; every sample's numbers are those of the op itself. ``blended``: ``op``
    already leaves the samples outside ``mask`` unchanged, exactly.
    """
    return op(x) if blended else _where(mask, op(x), x)


def _skipping_where(
    mask: torch.Tensor, op: Callable, x: torch.Tensor, blended: bool = False
) -> torch.Tensor:
    """:func:`_blended_where` for host masks: an op that no sample drew is not computed."""
    return _blended_where(mask, op, x, blended) if bool(mask.any()) else x


class PhotometricAugmentation(nn.Module):
    """
    MoCo v2's photometric augmentation of a batch of views, parameters drawn per sample.

    ``forward(images, boxes=None)`` draws the parameters (:meth:`draw`: uniforms on the
    images' device from torch's global generator) and applies them (:meth:`transform`). Loader
    workers (seeded per sample, from its position in the data stream) and training processes
    (seeded per rank and iteration, ``engine/resume.py``) therefore never share a stream, and a
    fixed ``SEED`` reproduces the draws, after a resume too. Every op runs on the whole batch
    and is blended in per sample, so the shapes never depend on the draws.
    """

    @configurable
    def __init__(
        self,
        *,
        color_jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
        color_jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_sigma: Tuple[float, float] = (0.1, 2.0),
        blur_prob: float = 0.5,
        blur_kernel_frac: float = 0.1,
        flip_prob: float = 0.5,
        randaugment: Optional[BatchRandAugment] = None,
    ):
        """
        Args:
            color_jitter: brightness, contrast, saturation, hue strengths (torchvision
                ColorJitter): factors in [max(0, 1 - s), 1 + s], hue shift in [-h, h].
            color_jitter_prob, grayscale_prob, blur_prob, flip_prob: per-sample probabilities.
            blur_sigma: range of the blur's standard deviation (pixels), uniform.
            blur_kernel_frac: the kernel side is the odd size nearest to this x view width.
            randaugment: applied first when given (DetCo "AA").
        """
        super().__init__()
        b, c, s, h = color_jitter
        # (lo, hi) of the uniform factor of each jitter op, in _JITTER_OPS order.
        self.register_buffer(
            "jitter_range",
            torch.tensor(
                [
                    [max(0.0, 1 - b), 1 + b],
                    [max(0.0, 1 - c), 1 + c],
                    [max(0.0, 1 - s), 1 + s],
                    [-h, h],
                ]
            ),
            persistent=False,
        )
        self.color_jitter_prob = color_jitter_prob
        self.grayscale_prob = grayscale_prob
        self.blur_sigma = tuple(blur_sigma)
        self.blur_prob = blur_prob
        self.blur_kernel_frac = blur_kernel_frac
        self.flip_prob = flip_prob
        self.randaugment = randaugment

    @classmethod
    def from_config(cls, cfg, randaugment: bool = False):
        p = cfg.INPUT.PRETRAIN
        return {
            "color_jitter": tuple(p.COLOR_JITTER),
            "color_jitter_prob": p.COLOR_JITTER_PROB,
            "grayscale_prob": p.GRAYSCALE_PROB,
            "blur_sigma": tuple(p.BLUR_SIGMA),
            "blur_prob": p.BLUR_PROB,
            "blur_kernel_frac": p.BLUR_KERNEL_FRAC,
            "flip_prob": p.FLIP_PROB,
            "randaugment": BatchRandAugment(p.RANDAUGMENT_OPS, p.RANDAUGMENT_MAGNITUDE)
            if randaugment and p.RANDAUGMENT_OPS > 0
            else None,
        }

    def kernel_size(self, width: int) -> int:
        return blur_kernel_size(width, self.blur_kernel_frac)

    def draw(
        self, n: int, generator: Optional[torch.Generator] = None, device=None
    ) -> torch.Tensor:
        """(n, UNIFORMS) uniform draws in [0, 1) that encode the parameters of ``n`` views
        (:meth:`params_from_uniforms`); one random kernel for the whole batch."""
        return torch.rand((n, UNIFORMS), generator=generator, device=device)

    def params_from_uniforms(self, u: torch.Tensor) -> Dict:
        """
        Args:
            u: (n, UNIFORMS) from :meth:`draw`.
        Returns:
            dict of tensors on ``u``'s device: "jitter" (n,) bool, "order" (n, 4) a permutation
            of the four jitter ops per sample, "factors" (n, 4) brightness/contrast/saturation
            factors and hue shift, "gray", "blur", "flip" (n,) bool, "sigma" (n,).
        """
        lo, hi = self.jitter_range.to(u).unbind(dim=1)
        s_lo, s_hi = self.blur_sigma
        return {
            "jitter": u[:, _JITTER] < self.color_jitter_prob,
            "order": u[:, _ORDER].argsort(dim=1),  # uniform over the 24 orders
            "factors": lo + (hi - lo) * u[:, _FACTORS],
            "gray": u[:, _GRAY] < self.grayscale_prob,
            "blur": u[:, _BLUR] < self.blur_prob,
            "sigma": s_lo + (s_hi - s_lo) * u[:, _SIGMA],
            "flip": u[:, _FLIP] < self.flip_prob,
        }

    def sample(self, n: int, generator: Optional[torch.Generator] = None, device=None) -> Dict:
        """
        Draw the parameters of ``n`` views on ``device`` (default the CPU), from torch's
        global generator or ``generator``: :meth:`params_from_uniforms`, plus "randaugment"
        (CPU tensors, see :class:`BatchRandAugment`) when RandAugment is on.
        """
        params = self.params_from_uniforms(self.draw(n, generator, device))
        if self.randaugment is not None:
            params["randaugment"] = self.randaugment.sample(n, generator)
        return params

    def apply(
        self,
        images: torch.Tensor,
        params: Dict,
        boxes: Optional[torch.Tensor] = None,
        boxes_if_flipped: Optional[torch.Tensor] = None,
        skip_undrawn: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """
        Args:
            images: (N, 3, H, W) RGB, uint8 or float in [0, 255].
            params: from :meth:`sample` with the same N.
            boxes: optional (N, ..., 4) XYXY boxes in pixels, flipped with their image.
            boxes_if_flipped: optional, shaped as ``boxes``: the boxes to use (flipped) instead
                of ``boxes`` for the samples that are flipped (a box that depends on the flip,
                e.g. InsLoc's query box augmentation drawn in the loader for both outcomes).
            skip_undrawn: ``params`` are host tensors (the loader's one view at a time): an op
                that no sample drew is skipped, not blended in (the same numbers, less work).
                Never in the training step, where reading a mask would wait for the device.
        Returns:
            images (N, 3, H, W) float in [0, 255], and the boxes (a new tensor) or None.
        """
        if self.randaugment is not None and "randaugment" in params:
            images = self.randaugment_images(images, params["randaugment"])
        params = {
            k: v.to(images.device, non_blocking=True)
            for k, v in params.items()
            if k != "randaugment"
        }
        op = _skipping_where if skip_undrawn else _blended_where
        x = images.float() / 255.0
        for position in range(4):  # torchvision's ColorJitter: its own random order per sample
            x = self._jitter_step(x, params, position, op)
        x = op(params["gray"], lambda x: P.to_grayscale(x).expand_as(x), x)
        k = self.kernel_size(x.shape[-1])
        x = op(params["blur"], lambda x: P.gaussian_blur(x, k, params["sigma"]), x)
        x = op(params["flip"], lambda x: x.flip(-1), x)
        return x * 255.0, self._flip_boxes(boxes, boxes_if_flipped, params["flip"], x.shape[-1])

    def randaugment_images(self, images: torch.Tensor, params: Dict) -> torch.Tensor:
        """RandAugment on 8-bit values, as torchvision's (its ops are grouped by the drawn op,
        with indices of CPU parameters: the one part that is not fixed-shape)."""
        if images.dtype != torch.uint8:
            images = images.round().clamp_(0, 255).to(torch.uint8)
        return self.randaugment.apply(images, params)

    @staticmethod
    def _flip_boxes(
        boxes: Optional[torch.Tensor],
        boxes_if_flipped: Optional[torch.Tensor],
        flip: torch.Tensor,
        width: int,
    ) -> Optional[torch.Tensor]:
        if boxes is None:
            return None
        boxes = boxes.to(device=flip.device, dtype=torch.float32)
        alternative = boxes if boxes_if_flipped is None else boxes_if_flipped.to(boxes)
        return _where(flip, P.hflip_boxes(alternative, width), boxes)

    @staticmethod
    def _jitter_step(x: torch.Tensor, params: Dict, position: int, op: Callable) -> torch.Tensor:
        """
        The ``position``-th op of every jittered sample's own order. Brightness, contrast and
        saturation are all ``blend(x, other, f)`` (other: black, the mean luma, the luma), so
        one blend over the whole batch serves the three (f = 1 leaves a sample unchanged,
        exactly); the hue rotation is blended in for the samples that drew it. Fixed shapes and
        few kernels: a training step is bound by kernel launches (bench/bench_e2e.py).
        """
        which, jitter = params["order"][:, position], params["jitter"]
        blends = jitter & (which < 3)

        def blend(x):
            drawn = params["factors"].gather(1, which.clamp(max=2)[:, None])[:, 0]
            f = torch.where(blends, drawn, 1.0)
            contrast = (blends & (which == 1)).to(x.dtype).view(-1, 1, 1, 1)
            saturation = (blends & (which == 2)).to(x.dtype).view(-1, 1, 1, 1)
            gray = P.to_grayscale(x)
            other = saturation * gray + contrast * gray.mean(dim=(1, 2, 3), keepdim=True)
            return P.blend(x, other, f)

        x = op(blends, blend, x, blended=True)
        return op(jitter & (which == 3), lambda x: P.adjust_hue(x, params["factors"][:, 3]), x)

    def forward(
        self,
        images: torch.Tensor,
        boxes: Optional[torch.Tensor] = None,
        boxes_if_flipped: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """
        Augment a batch with parameters drawn on its device (see :meth:`apply` for the
        arguments), in float32 even inside the training step's autocast (pixel values are data,
        not activations). The draws are made here, outside :meth:`transform`, so that a
        compiled ``transform`` sees the same random numbers as the eager one.
        """
        with torch.autocast(images.device.type, enabled=False):
            u = self.draw(images.shape[0], device=images.device)
            if self.randaugment is not None:
                images = self.randaugment_images(images, self.randaugment.sample(len(images)))
            return self.transform(images, u, boxes, boxes_if_flipped)

    def transform(
        self,
        images: torch.Tensor,
        uniforms: torch.Tensor,
        boxes: Optional[torch.Tensor] = None,
        boxes_if_flipped: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """:meth:`apply` of the parameters that ``uniforms`` (:meth:`draw`) encode, without
        RandAugment: fixed shapes and no host synchronisation, what the fast path compiles."""
        return self.apply(images, self.params_from_uniforms(uniforms), boxes, boxes_if_flipped)

    def augment_one(
        self, image: torch.Tensor, box: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """
        The loader-worker path: one (3, H, W) uint8 view (and its (4,) box) in, the augmented
        uint8 view (and box) out.
        """
        boxes = None if box is None else box[None].float()
        out, boxes = self.apply(image[None], self.sample(1), boxes, skip_undrawn=True)
        out = out[0].round_().clamp_(0, 255).to(torch.uint8)
        return out, (None if boxes is None else boxes[0] + 0.0)  # + 0.0: no -0.0 after a flip
