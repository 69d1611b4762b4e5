"""InsLoc's bounding-box augmentation (Yang et al., CVPR 2021, Sec. 4.2, Fig. 3).

The query's RoI is replaced by an anchor that overlaps the true box: anchors of an RPN-style
grid with IoU > 0.5 to the box are kept, NMS (0.7) on random scores thins them out, as the
reference does, and one survivor is picked at random. The key always keeps the true box.

How many anchors qualify and survive depends on the box, so the procedure has data-dependent
shapes: it runs in the loader (``CopyPasteMapper``), per sample, where that costs nothing, and
the training step stays fixed-shape. The reference picks the anchor for the box as finally
flipped, and the grid (offset 0) is mirror-symmetric only where the canvas side is a multiple of
the stride (the recipes: 256 / 16); so when the flip is drawn later on the device, the loader
picks one anchor for each outcome of the flip (:meth:`AnchorBoxAugmentation.for_both_flips`)
and the step keeps the one that matches, which is exact for any grid.
"""

from typing import Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import batched_nms
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.structures import Boxes, pairwise_iou
from torch import nn

from .photometric import hflip_boxes

__all__ = ["AnchorBoxAugmentation"]


class AnchorBoxAugmentation(nn.Module):
    """
    Replace each true box by a random anchor with IoU > ``iou_threshold`` to it. An image with
    no such anchor (a box far from every anchor shape) keeps its true box.
    """

    @configurable
    def __init__(
        self,
        *,
        stride: int,
        sizes: Sequence[float],
        aspect_ratios: Sequence[float],
        iou_threshold: float = 0.5,
        nms_threshold: float = 0.7,
    ):
        """
        Args:
            stride: spacing of the anchor grid in pixels (the reference: 16, P4's stride).
            sizes: anchor sizes (sqrt of the area) at every grid point.
            aspect_ratios: anchor aspect ratios (height / width).
            iou_threshold: anchors qualify when their IoU with the true box exceeds this.
            nms_threshold: IoU threshold of the NMS over qualifying anchors.
        """
        super().__init__()
        # Anchors centred on the grid points (offset 0), like the reference's mmdet grid.
        self.anchor_generator = DefaultAnchorGenerator(
            sizes=[list(sizes)], aspect_ratios=[list(aspect_ratios)], strides=[stride], offset=0.0
        )
        self.stride = stride
        self.iou_threshold = iou_threshold
        self.nms_threshold = nms_threshold

    @classmethod
    def from_config(cls, cfg):
        i = cfg.MODEL.INSLOC
        return {
            "stride": i.BOX_AUG_ANCHOR_STRIDE,
            "sizes": i.BOX_AUG_ANCHOR_SIZES,
            "aspect_ratios": i.BOX_AUG_ANCHOR_RATIOS,
            "iou_threshold": i.BOX_AUG_IOU,
            "nms_threshold": i.BOX_AUG_NMS,
        }

    def anchors(self, image_size: Tuple[int, int]) -> Boxes:
        """All anchors (A, 4) XYXY of the grid covering an image of ``image_size`` (H, W)."""
        h, w = (-(-s // self.stride) for s in image_size)  # ceil: the grid covers the image
        # The generator reads only the feature maps' shapes (anchors are made on the device of
        # its own buffers): an empty tensor carries the grid size.
        return self.anchor_generator([torch.empty((0, 0, h, w))])[0]

    @torch.no_grad()
    def forward(self, boxes: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """
        Args:
            boxes: (N, 4) XYXY true boxes, one per image.
            image_size: (H, W) of the images.
        Returns:
            (N, 4) augmented boxes: each has IoU > ``iou_threshold`` with its true box (or is
            the true box itself when no anchor qualifies).
        """
        anchors = self.anchors(image_size).tensor.to(boxes.dtype)
        iou = pairwise_iou(Boxes(boxes), Boxes(anchors))  # (N, A)
        image_idx, anchor_idx = torch.nonzero(iou > self.iou_threshold, as_tuple=True)
        lonely = torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
        lonely[image_idx] = False
        no_anchor = torch.nonzero(lonely, as_tuple=True)[0]
        candidates = torch.cat([anchors[anchor_idx], boxes[no_anchor]])
        owners = torch.cat([image_idx, no_anchor])
        scores = torch.rand(len(owners), device=boxes.device)
        keep = batched_nms(candidates, scores, owners, self.nms_threshold)
        return candidates[keep[_pick_one_per_group(owners[keep], len(boxes))]]

    @torch.no_grad()
    def for_both_flips(self, boxes: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """
        Args:
            boxes: (N, 4) XYXY true boxes of views that may be flipped horizontally later.
            image_size: (H, W) of the views.
        Returns:
            (N, 2, 4): ``[:, 0]`` the augmented box if the view stays as it is; ``[:, 1]`` the
            augmentation of the mirrored box, mirrored back, so that flipping it with its view
            gives an anchor of the grid drawn for the flipped box. Independent draws.
        """
        width = image_size[1]
        mirrored = hflip_boxes(self(hflip_boxes(boxes, width), image_size), width)
        return torch.stack([self(boxes, image_size), mirrored], dim=1)


def _pick_one_per_group(groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """
    Args:
        groups: (M,) group id in [0, num_groups) of each element; every group is present.
    Returns:
        (num_groups,) index of one uniformly random element of each group, in group order.
    """
    # Sort by group + a random fraction: within a group the order is random; take the first.
    jitter = torch.rand(len(groups), device=groups.device, dtype=torch.float64)
    order = torch.argsort(groups.to(torch.float64) + jitter)
    first = torch.ones(len(order), dtype=torch.bool, device=groups.device)
    first[1:] = groups[order[1:]] != groups[order[:-1]]
    picked = order[first]
    assert len(picked) == num_groups, "every image must have a candidate box"
    return picked
