"""InsLoc on R50-FPN (Yang et al., CVPR 2021): the task runs on every level P2..P5 at once.

The encoder is made of detectron2's own blocks so that pretrained tensors transfer by name:
``encoder_q.backbone`` is the ``FPN`` (``bottom_up.*``, ``fpn_lateral2.*``, ``fpn_output2.*``...)
-> ``backbone.*``; ``encoder_q.box_head`` is a ``FastRCNNConvFCHead`` 4conv1fc (``conv1..conv4``,
``fc1``) -> ``roi_heads.box_head.*``. Only ``encoder_q.embed`` (fc2, fc3) is pretraining-only.
The training step is :class:`~.insloc.InstanceLocalization`.
"""

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.roi_heads import FastRCNNConvFCHead
from torch import nn

from ..heads import ProjectionMLP
from .insloc import InstanceLocalization, boxes_per_level, level_poolers, pool_boxes

__all__ = ["InsLocFPN", "FPNBoxEncoder"]


class FPNBoxEncoder(nn.Module):
    """
    FPN -> RoIAlign of one box per image on each of ``in_features`` -> the shared detectron2 box
    head (4conv1fc) -> ``embed`` (fc2, fc3) -> unit-norm embedding per level.
    """

    def __init__(
        self,
        backbone: Backbone,
        in_features: Sequence[str],
        poolers: nn.ModuleDict,
        box_head: nn.Module,
        embed: nn.Module,
        roi_align: bool = True,
    ):
        super().__init__()
        self.backbone = backbone
        self.in_features = list(in_features)
        self.poolers = poolers
        self.box_head = box_head
        self.embed = embed
        self.roi_align = roi_align

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            images: (N, 3, H, W) normalised composites.
            boxes: (N, 4) XYXY boxes, or (N, L, 4) one per level of ``in_features``.
        Returns:
            {level: (N, D) unit-norm embedding}.
        """
        features = self.backbone(images)
        boxes = boxes_per_level(boxes, len(self.in_features))
        pooled = [
            pool_boxes(
                self.poolers[f] if self.roi_align else None,
                features[f],
                boxes[:, i],
                self.poolers[f].output_size[0],
            )
            for i, f in enumerate(self.in_features)
        ]
        # One pass of the shared head over all levels (as the reference: BN sees all of them).
        z = F.normalize(self.embed(self.box_head(torch.cat(pooled))), dim=1)
        return dict(zip(self.in_features, z.split(images.shape[0])))


@META_ARCH_REGISTRY.register()
class InsLocFPN(InstanceLocalization):
    """InsLoc on R50-FPN: RoIAlign 7x7 on P2..P5, 4conv1fc (BN) + fc2 + fc3 -> 128."""

    @classmethod
    def build_encoder(cls, cfg) -> FPNBoxEncoder:
        # The same builder (`MODEL.BACKBONE.NAME: build_resnet_fpn_backbone`) as the downstream
        # Mask R-CNN, so every backbone tensor has its detector name. Its parameter-free P6 is
        # computed but not used.
        backbone = build_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
        in_features = cfg.MODEL.INSLOC.IN_FEATURES
        poolers = level_poolers(cfg, backbone, in_features)
        channels = {backbone.output_shape()[f].channels for f in in_features}
        assert len(channels) == 1, "the box head is shared: levels need the same channels"
        r = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
        box_head = FastRCNNConvFCHead(cfg, ShapeSpec(channels=channels.pop(), height=r, width=r))
        embed = ProjectionMLP(
            box_head.output_shape.channels,
            cfg.MODEL.INSLOC.FC_DIM,
            cfg.MODEL.CONTRAST.DIM,
            cfg.MODEL.CONTRAST.MLP_NORM,
        )
        return FPNBoxEncoder(
            backbone, in_features, poolers, box_head, embed, roi_align=cfg.MODEL.INSLOC.ROI_ALIGN
        )
