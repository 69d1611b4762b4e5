"""MoCo v2 augmentation on uint8 tensors with ``torchvision.transforms.v2``.

Tensors in, tensors out: the same transforms run on a CPU worker today and can run batched on
the accelerator later. Parameters are the MoCo v2 ones (Chen et al. 2020, "Improved Baselines
with Momentum Contrastive Learning"), read from ``cfg.INPUT.PRETRAIN``.
"""
from typing import Sequence, Tuple

from torchvision.transforms import v2

__all__ = ["blur_kernel_size", "build_photometric_augmentation", "build_moco_v2_augmentation"]


def blur_kernel_size(view_size: int, frac: float) -> int:
    """The odd kernel side nearest to ``frac * view_size`` (at least 3)."""
    k = int(round(frac * view_size))
    return max(3, k if k % 2 == 1 else k + 1)


def build_photometric_augmentation(
    *,
    view_size: int,
    color_jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
    color_jitter_prob: float = 0.8,
    grayscale_prob: float = 0.2,
    blur_sigma: Tuple[float, float] = (0.1, 2.0),
    blur_prob: float = 0.5,
    blur_kernel_frac: float = 0.1,
) -> v2.Compose:
    """Colour jitter, random grayscale and Gaussian blur, in MoCo v2's order."""
    b, c, s, h = color_jitter
    return v2.Compose(
        [
            v2.RandomApply([v2.ColorJitter(b, c, s, h)], p=color_jitter_prob),
            v2.RandomGrayscale(p=grayscale_prob),
            v2.RandomApply(
                [v2.GaussianBlur(blur_kernel_size(view_size, blur_kernel_frac), tuple(blur_sigma))],
                p=blur_prob,
            ),
        ]
    )


def photometric_args_from_config(cfg, view_size: int) -> dict:
    p = cfg.INPUT.PRETRAIN
    return dict(
        view_size=view_size,
        color_jitter=tuple(p.COLOR_JITTER),
        color_jitter_prob=p.COLOR_JITTER_PROB,
        grayscale_prob=p.GRAYSCALE_PROB,
        blur_sigma=tuple(p.BLUR_SIGMA),
        blur_prob=p.BLUR_PROB,
        blur_kernel_frac=p.BLUR_KERNEL_FRAC,
    )


def build_moco_v2_augmentation(cfg) -> v2.Compose:
    """RandomResizedCrop -> photometric -> horizontal flip, on a (3, H, W) uint8 tensor."""
    p = cfg.INPUT.PRETRAIN
    ops = [
        v2.RandomResizedCrop(
            p.CROP_SIZE, scale=tuple(p.CROP_SCALE), ratio=tuple(p.CROP_RATIO), antialias=True
        ),
        build_photometric_augmentation(**photometric_args_from_config(cfg, p.CROP_SIZE)),
        v2.RandomHorizontalFlip(p=p.FLIP_PROB),
    ]
    if p.RANDAUGMENT_OPS > 0:
        # DetCo's "AA" variant: RandAugment on the global views (policy unpublished; choice:
        # torchvision's RandAugment after the crop).
        ops.insert(1, v2.RandAugment(num_ops=p.RANDAUGMENT_OPS, magnitude=p.RANDAUGMENT_MAGNITUDE))
    return v2.Compose(ops)
