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
from typing import Dict, Optional, Sequence, Tuple

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


def _indices(mask: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
    """Positions of the True entries of a CPU mask, on ``device`` (None if there are none).

    The parameters are drawn on the CPU, so which samples an operation touches is known without
    asking the GPU (no synchronisation), and only those samples are computed.
    """
    idx = mask.nonzero().squeeze(1)
    return idx.to(device, non_blocking=True) if idx.numel() else None


class PhotometricAugmentation(nn.Module):
    """
    MoCo v2's photometric augmentation of a batch of views, parameters drawn per sample.

    ``forward(images, boxes=None)`` draws the parameters (:meth:`sample`, on the CPU from
    torch's global generator, or ``generator``) and applies them (:meth:`apply`) on the
    images' device. Loader workers (seeded by detectron2 per worker) and training processes
    (seeded per rank by ``default_setup``) therefore never share a stream, and a fixed
    ``SEED`` reproduces the draws.
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
            torch.tensor([[max(0.0, 1 - b), 1 + b], [max(0.0, 1 - c), 1 + c],
                          [max(0.0, 1 - s), 1 + s], [-h, h]]),  # fmt: skip
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

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Dict:
        """
        Draw the parameters of ``n`` views, on the CPU.

        Returns:
            dict of CPU tensors: "jitter" (n,) bool, "order" (n, 4) a permutation of the four
            jitter ops per sample, "factors" (n, 4) brightness/contrast/saturation factors and
            hue shift, "gray", "blur", "flip" (n,) bool, "sigma" (n,), and "randaugment" when
            RandAugment is on.
        """

        def uniform(*shape):
            return torch.rand(shape, generator=generator)

        lo, hi = self.jitter_range.cpu().unbind(dim=1)
        params = {
            "jitter": uniform(n) < self.color_jitter_prob,
            "order": uniform(n, 4).argsort(dim=1),  # uniform over the 24 orders
            "factors": lo + (hi - lo) * uniform(n, 4),
            "gray": uniform(n) < self.grayscale_prob,
            "blur": uniform(n) < self.blur_prob,
            "sigma": self.blur_sigma[0] + (self.blur_sigma[1] - self.blur_sigma[0]) * uniform(n),
            "flip": uniform(n) < self.flip_prob,
        }
        if self.randaugment is not None:
            params["randaugment"] = self.randaugment.sample(n, generator)
        return params

    def apply(
        self, images: torch.Tensor, params: Dict, boxes: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """
        Args:
            images: (N, 3, H, W) RGB, uint8 or float in [0, 255].
            params: from :meth:`sample` with the same N.
            boxes: optional (N, 4) XYXY boxes in pixels, flipped with their image.
        Returns:
            images (N, 3, H, W) float in [0, 255], and the boxes (a new tensor) or None.
        """
        device = images.device
        if self.randaugment is not None:  # on 8-bit values, as torchvision's RandAugment
            if images.dtype != torch.uint8:
                images = images.round().clamp_(0, 255).to(torch.uint8)
            images = self.randaugment.apply(images, params["randaugment"])
        x = images.float() / 255.0
        for position in range(4):  # torchvision's ColorJitter: its own random order per sample
            x = self._jitter_step(x, params, position)
        idx = _indices(params["gray"], device)
        if idx is not None:
            x.index_copy_(0, idx, P.to_grayscale(x[idx]).expand(-1, 3, -1, -1))
        idx = _indices(params["blur"], device)
        if idx is not None:
            sigma = params["sigma"].to(device, non_blocking=True)[idx]
            x.index_copy_(0, idx, P.gaussian_blur(x[idx], self.kernel_size(x.shape[-1]), sigma))
        idx = _indices(params["flip"], device)
        if idx is not None:
            x.index_copy_(0, idx, x[idx].flip(-1))
            if boxes is not None:
                boxes = boxes.to(device=device, dtype=torch.float32, copy=True)
                boxes.index_copy_(0, idx, P.hflip_boxes(boxes[idx], x.shape[-1]))
        return x * 255.0, boxes

    @staticmethod
    def _jitter_step(x: torch.Tensor, params: Dict, position: int) -> torch.Tensor:
        """
        The ``position``-th op of every jittered sample's own order. Brightness, contrast and
        saturation are all ``blend(x, other, f)`` (other: black, the mean luma, the luma), so
        one blend over the whole batch serves the three (f = 1 leaves a sample unchanged);
        the hue rotation runs on the samples that drew it. Few kernels per batch matters: a
        training step at batch 64 is bound by kernel launches (bench/bench_e2e.py --profile).
        """
        device = x.device
        op = params["order"][:, position]
        blends = params["jitter"] & (op < 3)
        if blends.any():
            drawn = params["factors"].gather(1, op.clamp(max=2)[:, None])[:, 0]
            f = torch.where(blends, drawn, 1.0)
            contrast, saturation = (blends & (op == 1)).float(), (blends & (op == 2)).float()
            f, contrast, saturation = torch.stack([f, contrast, saturation]).to(
                device, non_blocking=True
            )
            other = torch.zeros((), device=device)
            if (blends & (op > 0)).any():
                gray = P.to_grayscale(x)
                mean = gray.mean(dim=(1, 2, 3), keepdim=True)
                other = saturation.view(-1, 1, 1, 1) * gray + contrast.view(-1, 1, 1, 1) * mean
            x = P.blend(x, other, f)
        idx = _indices(params["jitter"] & (op == 3), device)
        if idx is not None:
            shift = params["factors"][:, 3].to(device, non_blocking=True)[idx]
            x.index_copy_(0, idx, P.adjust_hue(x[idx], shift))
        return x

    def forward(
        self, images: torch.Tensor, boxes: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Augment a batch: :meth:`sample` then :meth:`apply`, in float32 even inside the
        training step's autocast (pixel values are data, not activations)."""
        with torch.autocast(images.device.type, enabled=False):
            return self.apply(images, self.sample(images.shape[0]), boxes)

    def augment_one(
        self, image: torch.Tensor, box: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """
        The loader-worker path: one (3, H, W) uint8 view (and its (4,) box) in, the augmented
        uint8 view (and box) out.
        """
        out, boxes = self(image[None], None if box is None else box[None].float())
        out = out[0].round_().clamp_(0, 255).to(torch.uint8)
        return out, (None if boxes is None else boxes[0] + 0.0)  # + 0.0: no -0.0 after a flip
