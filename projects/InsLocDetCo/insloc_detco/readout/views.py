"""
Augmented-view retrieval: the pretext task itself, read out on held-out images.

Every contrastive method here trains one thing first: two augmented views of an image must be
closer to each other than to views of other images. This readout measures exactly that on
images the pretraining never saw: each validation image gets two views drawn with the
pretraining augmentation (MoCo v2's: RandomResizedCrop scale 0.2-1, colour jitter p 0.8,
grayscale p 0.2, Gaussian blur p 0.5, flip; :mod:`insloc_detco.data.augmentation`, the one
definition the pretraining uses), the frozen network pools each stage, and a view-A query is
right when its nearest view-B neighbour (cosine) is the other view of its own image. Chance is
1 / N. It needs no labels and moves after a few hundred CPU steps, long before semantic readouts
(kNN, linear) do, so it is what the CPU demo shows next to random init; it is not a proxy for
transfer, which the semantic readouts and the detection fine-tunes measure.
"""

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from detectron2.utils import comm

from .features import extract_features

__all__ = ["pretraining_view_transform", "view_retrieval", "view_retrieval_top1"]


class _PretrainingView:
    """(3, H, W) uint8 -> one augmented (3, size, size) uint8 view (global torch RNG)."""

    def __init__(self, size: int):
        from detectron2.config import get_cfg

        from ..config import add_insloc_detco_config
        from ..data.augmentation import PhotometricAugmentation, build_view_crop

        cfg = get_cfg()
        add_insloc_detco_config(cfg)  # the defaults are MoCo v2's augmentation
        self.crop = build_view_crop(cfg, size)
        self.photometric = PhotometricAugmentation(cfg)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.photometric.augment_one(self.crop(image))[0]


def pretraining_view_transform(size: int) -> _PretrainingView:
    """The pretraining augmentation of one view at ``size`` px, as a per-image transform."""
    return _PretrainingView(size)


def view_retrieval(
    encoder,
    records: List[Dict],
    size: int,
    stages: Sequence[str],
    seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 0,
    name: str = "",
) -> Dict[str, float]:
    """
    The readout on ``records``: two views of each (view v of record i drawn from the torch seed
    ``(2 * seed + v) * 10**7 + i``), features of ``stages`` in every process, the retrieval in
    the main process.

    Returns:
        {"top1_<stage>": %} in the main process, {} in the others.
    """
    view = pretraining_view_transform(size)
    a, b = (
        extract_features(
            encoder,
            records,
            view,
            stages=stages,
            batch_size=batch_size,
            num_workers=num_workers,
            name=f"{name} view {v}",
            seed=(2 * seed + v) * 10_000_000,
        )
        for v in (0, 1)
    )
    if not comm.is_main_process():
        return {}
    return view_retrieval_top1({k: a[k] for k in stages}, {k: b[k] for k in stages})


def view_retrieval_top1(
    views_a: Dict[str, torch.Tensor], views_b: Dict[str, torch.Tensor], chunk: int = 4096
):
    """
    Args:
        views_a, views_b: {stage: (N, C)} features of view A / view B of the same N images,
            in the same order.
        chunk: view-A rows compared at a time (the full N x N similarity of a 50,000-image
            validation set would take 10 GB).
    Returns:
        {"top1_<stage>": % of view-A rows whose most similar view-B row (cosine) is row i}.
    """
    out = {}
    for stage, a in views_a.items():
        b = views_b[stage]
        if a.shape != b.shape or a.dim() != 2:
            raise ValueError(f"{stage}: view features of different shapes {a.shape} {b.shape}")
        a, b = F.normalize(a.float(), dim=1), F.normalize(b.float(), dim=1)
        hits = 0
        for i in range(0, len(a), chunk):
            nearest = (a[i : i + chunk] @ b.T).argmax(dim=1)
            hits += nearest.eq(torch.arange(i, i + len(nearest), device=nearest.device)).sum()
        out[f"top1_{stage}"] = 100.0 * int(hits) / len(a)
    return out
