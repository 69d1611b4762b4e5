"""InsLoc's copy-paste compositor (Yang et al., CVPR 2021, Sec. 4.1, Eq. 3-4) as a dataset mapper.

Per view: a crop of the instance image I (area (0.2, 1), aspect log-uniform in (0.5, 2)) is
rescaled, keeping its aspect, to fit a random (w, h) with w, h in [128, 255), and pasted fully
inside a background B resized to the 256 x 256 canvas at a uniform random position. The box of
the pasted rectangle, (x1, y1, x2, y2) in canvas pixels, is the view's only box. The MoCo v2
photometric augmentation and a horizontal flip (which flips the box too) follow, here or on the
training device (``INPUT.PRETRAIN.AUGMENT_ON``, see :mod:`.augmentation`). The two views use
independent crops and different backgrounds.

Backgrounds come from one of two sources (``INPUT.PRETRAIN.COPY_PASTE.BACKGROUND``):

* ``"dataset"``: a fresh random image of the data set per view, as the reference does (three
  decodes per sample);
* ``"batch"``: the other images of the same batch, already decoded (no extra decode). The
  mapper prepares the foregrounds and the sample's own resized image; :meth:`collate` pastes.

All randomness comes from torch's global generator, which the loader re-seeds for every sample
from its position in the data stream (:mod:`.sampler`), so workers, ranks and epochs never
share a stream, and a resumed run draws what the uninterrupted one would have.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .augmentation import PhotometricAugmentation, build_view_crop, photometric_on_device
from .box_aug import AnchorBoxAugmentation
from .mapper import PRETRAIN_MAPPER_REGISTRY, PretrainDatasetMapper

__all__ = ["sample_foreground", "paste", "CopyPasteMapper"]


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high) from torch's global generator (worker-seeded)."""
    return int(torch.randint(low, high, ()))


def sample_foreground(
    image: torch.Tensor,
    crop_scale: Tuple[float, float],
    crop_ratio: Tuple[float, float],
    paste_size: Tuple[int, int],
) -> torch.Tensor:
    """
    A random crop of the instance, rescaled keeping its aspect to fit a random (w, h).

    The fit follows the reference's rescale rule: the crop's long side may be at most
    max(w, h) and its short side at most min(w, h), so that the scale does not depend on the
    crop's orientation; one of the two limits is met, hence the longer side of the result is
    in [paste_size[0], paste_size[1]).

    Args:
        image: (3, H, W) uint8.
        crop_scale: area range of the crop, as a fraction of the image.
        crop_ratio: aspect range (w/h) of the crop, sampled log-uniformly.
        paste_size: [lo, hi) range of the target w and h.
    Returns:
        (3, h', w') uint8 foreground with max(h', w') in [lo, hi).
    """
    top, left, h, w = v2.RandomResizedCrop.get_params(image, list(crop_scale), list(crop_ratio))
    tw, th = _randint(*paste_size), _randint(*paste_size)
    factor = min(max(tw, th) / max(w, h), min(tw, th) / min(w, h))
    size = [max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))]
    return TF.resized_crop(image, top, left, h, w, size, antialias=True)


def paste(background: torch.Tensor, foreground: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Paste ``foreground`` fully inside ``background`` at a uniform random position.

    Args:
        background: (3, S, S) uint8 canvas (not modified).
        foreground: (3, h, w) uint8 with h, w <= S.
    Returns:
        canvas: (3, S, S) uint8 composite.
        box: (4,) float32 XYXY of the pasted rectangle (pixels [x1, x2) x [y1, y2)).
    """
    (fh, fw), (ch, cw) = foreground.shape[-2:], background.shape[-2:]
    assert fh <= ch and fw <= cw, f"foreground {fh}x{fw} does not fit the {ch}x{cw} canvas"
    y, x = _randint(0, ch - fh + 1), _randint(0, cw - fw + 1)
    canvas = background.clone()
    canvas[:, y : y + fh, x : x + fw] = foreground
    return canvas, torch.tensor([x, y, x + fw, y + fh], dtype=torch.float32)


@PRETRAIN_MAPPER_REGISTRY.register()
class CopyPasteMapper(PretrainDatasetMapper):
    """
    InsLoc views: ``view_q``, ``view_k`` (3, S, S) uint8 composites and ``box_q``, ``box_k``
    (4,) float32 XYXY boxes of the pasted instance in each (after the flip), and, with the
    box augmentation, ``box_q_aug`` (2, 4): the query's augmented box for a view that is not
    flipped later and for one that is (see :meth:`AnchorBoxAugmentation.for_both_flips`; the
    two rows are one draw when the flip was made here).

    With ``copy_paste=False`` (InsLoc Table 3b, "RoIAlign only") the views are plain MoCo v2
    crops of side S and the box is the whole view.
    """

    @configurable
    def __init__(
        self,
        *,
        canvas_size: int,
        crop_scale: Sequence[float],
        crop_ratio: Sequence[float],
        paste_size: Sequence[int],
        background: str,
        copy_paste: bool,
        photometric: Optional[PhotometricAugmentation],
        view_crop: Optional[v2.Transform] = None,
        box_aug: Optional[AnchorBoxAugmentation] = None,
        **kwargs,
    ):
        """
        Args:
            canvas_size: S, side of the square canvas.
            crop_scale, crop_ratio: area and aspect (w/h) ranges of the foreground crop.
            paste_size: [lo, hi) range of the random (w, h) the crop is fitted into.
            background: "dataset" or "batch" (see the module docstring).
            copy_paste: compose views on backgrounds; False: plain crops, box = whole view.
            photometric: colour augmentation and box-aware flip of each composite, here in the
                loader; None when the model applies it on the training device.
            view_crop: the RandomResizedCrop of the plain views (``copy_paste=False``).
            box_aug: InsLoc's query box augmentation (``MODEL.INSLOC.BOX_AUG``), or None.
            kwargs: see :class:`PretrainDatasetMapper`; "dataset" backgrounds are drawn from
                its ``file_names``.
        """
        super().__init__(**kwargs)
        assert background in ("dataset", "batch"), f"unknown background source '{background}'"
        if copy_paste:
            assert paste_size[1] <= canvas_size, "the pasted instance must fit inside the canvas"
        if copy_paste and background == "dataset":
            assert self.file_names, "'dataset' backgrounds need the dataset's file names"
        self.canvas_size = canvas_size
        self.crop_scale = tuple(crop_scale)
        self.crop_ratio = tuple(crop_ratio)
        self.paste_size = tuple(paste_size)
        self.background = background
        self.copy_paste = copy_paste
        self.photometric = photometric
        self.view_crop = view_crop
        self.box_aug = box_aug

    @classmethod
    def from_config(cls, cfg, dataset_dicts: Optional[List[Dict]] = None):
        ret = super().from_config(cfg, dataset_dicts)
        cp = cfg.INPUT.PRETRAIN.COPY_PASTE
        ret.update(
            canvas_size=cp.CANVAS_SIZE,
            crop_scale=cp.CROP_SCALE,
            crop_ratio=cp.CROP_RATIO,
            paste_size=cp.PASTE_SIZE,
            background=cp.BACKGROUND,
            copy_paste=cfg.MODEL.INSLOC.COPY_PASTE,
            photometric=None if photometric_on_device(cfg) else PhotometricAugmentation(cfg),
            view_crop=build_view_crop(cfg, cp.CANVAS_SIZE),
            box_aug=AnchorBoxAugmentation(cfg) if cfg.MODEL.INSLOC.BOX_AUG else None,
        )
        return ret

    def make_views(self, image: torch.Tensor, dataset_dict: Dict) -> Dict:
        if not self.copy_paste:
            full = torch.tensor([0, 0, self.canvas_size, self.canvas_size], dtype=torch.float32)
            view_q, box_q = self.finish_view(self.view_crop(image), full)
            view_k, box_k = self.finish_view(self.view_crop(image), full)
            return self.with_box_aug(
                {"view_q": view_q, "box_q": box_q, "view_k": view_k, "box_k": box_k}
            )
        fg_q, fg_k = self.foreground(image), self.foreground(image)
        if self.background == "batch":
            # Composed in `collate`, where the other images of the batch are at hand.
            return {"foreground_q": fg_q, "foreground_k": fg_k, "background": self.resize(image)}
        bg_q, bg_k = self.dataset_backgrounds(dataset_dict.get("file_name"))
        view_q, box_q = self.finish_view(*paste(bg_q, fg_q))
        view_k, box_k = self.finish_view(*paste(bg_k, fg_k))
        return self.with_box_aug(
            {"view_q": view_q, "box_q": box_q, "view_k": view_k, "box_k": box_k}
        )

    def collate(self, batch: List[Dict]) -> List[Dict]:
        """
        ``"batch"`` backgrounds: paste each sample's two foregrounds on two *different* other
        images of the batch (never its own). Other modes: the list is returned as is.

        Args:
            batch: this worker's batch of :meth:`make_views` outputs.
        Returns:
            list of dicts with ``view_q``, ``box_q``, ``view_k``, ``box_k``.
        """
        if not (self.copy_paste and self.background == "batch"):
            return batch
        n = len(batch)
        if n < 3:
            raise ValueError(
                f"BACKGROUND='batch' needs >= 3 images per process batch (got {n}): one "
                "instance and two different backgrounds. Use BACKGROUND='dataset'."
            )
        backgrounds = [d.pop("background") for d in batch]
        for i, d in enumerate(batch):
            # Two distinct indices among the n - 1 others: skip over i.
            j_q, j_k = (j + int(j >= i) for j in torch.randperm(n - 1)[:2].tolist())
            for view, j in (("q", j_q), ("k", j_k)):
                canvas, box = paste(backgrounds[j], d.pop(f"foreground_{view}"))
                d[f"view_{view}"], d[f"box_{view}"] = self.finish_view(canvas, box)
        return [self.with_box_aug(d) for d in batch]

    def with_box_aug(self, views: Dict) -> Dict:
        """Add ``box_q_aug`` (2, 4) to finished views, when the box augmentation is on."""
        if self.box_aug is None:
            return views
        size = tuple(views["view_q"].shape[-2:])
        box = views["box_q"][None]
        if self.photometric is None:  # the model flips the view later, or not
            views["box_q_aug"] = self.box_aug.for_both_flips(box, size)[0]
        else:  # flipped here already: one draw, for the box as it is
            views["box_q_aug"] = self.box_aug(box, size).expand(2, 4).clone()
        return views

    def foreground(self, image: torch.Tensor) -> torch.Tensor:
        return sample_foreground(image, self.crop_scale, self.crop_ratio, self.paste_size)

    def resize(self, image: torch.Tensor) -> torch.Tensor:
        """The whole image squashed to the S x S canvas (aspect not kept, as in the reference)."""
        return TF.resize(image, [self.canvas_size, self.canvas_size], antialias=True)

    def dataset_backgrounds(self, own_file: Optional[str]) -> List[torch.Tensor]:
        """
        Two different random readable images of the data set, neither of them ``own_file``
        (as long as the data set has enough readable images), each resized to the canvas.
        Unreadable ones are counted as skipped, like samples.
        """
        _, first, image_q = self.read_random(exclude={own_file})
        _, _, image_k = self.read_random(exclude={own_file, first})
        return [self.resize(image_q), self.resize(image_k)]

    def finish_view(
        self, canvas: torch.Tensor, box: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Photometric augmentation and a box-aware horizontal flip, unless the model applies them.

        Args:
            canvas: (3, S, S) uint8; box: (4,) XYXY.
        Returns:
            view (3, S, S) uint8 and box (4,) float32, flipped together.
        """
        if self.photometric is None:
            return canvas, box.float()
        return self.photometric.augment_one(canvas, box)
