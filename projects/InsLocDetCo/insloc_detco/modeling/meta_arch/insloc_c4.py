"""InsLoc on R50-C4 (Yang et al., CVPR 2021, Sec. 4.3: "the RoI operation on the output of the
4th residual block; the whole 5th residual block is the head").

The authors never released C4 pretraining; this follows the paper's description with the
layout of detectron2's C4 detector: RoIAlign of the box on res4 (stride 16) at the detector's
pooler resolution (``MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION``, 14), then res5 built by
``Res5ROIHeads`` itself (its first block has stride 2: 14 -> 7), then average pooling and the MoCo
v2 MLP -> 128. Transfer names: ``encoder_q.backbone.*`` -> ``backbone.*`` and
``encoder_q.res5.*`` -> ``roi_heads.res5.*``; only ``encoder_q.head`` is pretraining-only.
"""

from typing import Dict

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.roi_heads import Res5ROIHeads
from torch import nn

from ..heads import GlobalEmbeddingHead
from .insloc import InstanceLocalization, boxes_per_level, level_poolers, pool_boxes

__all__ = ["InsLocC4", "C4BoxEncoder"]


class C4BoxEncoder(nn.Module):
    """ResNet res2-res4 -> RoIAlign of one box per image on res4 -> res5 -> avgpool -> MLP."""

    def __init__(
        self,
        backbone: Backbone,
        in_feature: str,
        pooler: nn.Module,
        res5: nn.Module,
        head: nn.Module,
        roi_align: bool = True,
    ):
        super().__init__()
        self.backbone = backbone
        self.in_feature = in_feature
        self.pooler = pooler
        self.res5 = res5
        self.head = head
        self.roi_align = roi_align

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            images: (N, 3, H, W) normalised composites.
            boxes: (N, 4) or (N, 1, 4) XYXY boxes.
        Returns:
            {in_feature: (N, D) unit-norm embedding}.
        """
        feature = self.backbone(images)[self.in_feature]
        box = boxes_per_level(boxes, 1)[:, 0]
        pooler = self.pooler if self.roi_align else None
        x = pool_boxes(pooler, feature, box, self.pooler.output_size[0])
        return {self.in_feature: self.head(self.res5(x))}


@META_ARCH_REGISTRY.register()
class InsLocC4(InstanceLocalization):
    """InsLoc on R50-C4: RoIAlign 14x14 on res4, res5 as the RoI head, MLP -> 128."""

    @classmethod
    def build_encoder(cls, cfg) -> C4BoxEncoder:
        in_features = cfg.MODEL.INSLOC.IN_FEATURES
        assert len(in_features) == 1, f"C4 pools from one feature map, got {in_features}"
        backbone = build_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
        assert "res5" not in backbone.output_shape(), "res5 is the RoI head: OUT_FEATURES res4"
        pooler = level_poolers(cfg, backbone, in_features)[in_features[0]]
        res5, channels = Res5ROIHeads._build_res5_block(cfg)
        c = cfg.MODEL.CONTRAST
        head = GlobalEmbeddingHead(channels, c.MLP_HIDDEN_DIM, c.DIM, c.MLP_NORM)
        return C4BoxEncoder(
            backbone, in_features[0], pooler, res5, head, roi_align=cfg.MODEL.INSLOC.ROI_ALIGN
        )
