"""InsLoc, instance localization (Yang et al., CVPR 2021): the training step shared by the R50-FPN
and R50-C4 variants, and the RoI pooling both use.

The query is a composite image and the box of the pasted instance; its embedding is the RoI
feature of that box (Eq. 5-6) through a detection head, contrasted with the key of another
composite of the same instance (Eq. 2). Each level with a loss has its own queue "to avoid
cheating across levels" (Sec. 4.3), and the losses are summed. The encoders live in
``insloc_fpn.py`` and ``insloc_c4.py``.
"""

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import Backbone
from detectron2.modeling.poolers import ROIPooler
from torch import nn

from ..contrastive import ContrastiveQueue
from .base import ContrastivePretrainer, ContrastTerm, contrastive_args_from_config

__all__ = ["InstanceLocalization", "pool_boxes", "level_poolers", "boxes_per_level"]


def level_poolers(cfg, backbone: Backbone, in_features: Sequence[str]) -> nn.ModuleDict:
    """One single-scale ``ROIPooler`` per feature map, so that the box is pooled from every
    level (no size-based level assignment). Resolution and type from ``MODEL.ROI_BOX_HEAD``."""
    h = cfg.MODEL.ROI_BOX_HEAD
    shapes = backbone.output_shape()
    return nn.ModuleDict(
        {
            f: ROIPooler(
                output_size=h.POOLER_RESOLUTION,
                scales=(1.0 / shapes[f].stride,),
                sampling_ratio=h.POOLER_SAMPLING_RATIO,
                pooler_type=h.POOLER_TYPE,
            )
            for f in in_features
        }
    )


def pool_boxes(pooler: Optional[ROIPooler], feature: torch.Tensor, boxes: torch.Tensor, size: int):
    """
    Args:
        pooler: the level's ``ROIPooler``; None pools the whole map instead (InsLoc Table 3b
            baseline without RoIAlign).
        feature: (N, C, H, W) one feature map.
        boxes: (N, 4) XYXY image-pixel boxes, one per image.
        size: output side when ``pooler`` is None.
    Returns:
        (N, C, R, R) pooled features.
    """
    if pooler is None:
        return F.adaptive_avg_pool2d(feature, size)
    assert len(pooler.level_poolers) == 1, "one pooler per feature map (level_poolers)"
    # ROIPooler's (K, 5) format (image index, box) for one box per image, made in two ops
    # instead of one Boxes and one concatenation per image: what ROIPooler does with one level.
    index = torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)
    return pooler.level_poolers[0](feature, torch.cat([index[:, None], boxes], dim=1))


def boxes_per_level(boxes: torch.Tensor, num_levels: int) -> torch.Tensor:
    """(N, 4) or (N, L, 4) -> (N, L, 4): one box per image and level."""
    return boxes[:, None].expand(-1, num_levels, -1) if boxes.dim() == 2 else boxes


class InstanceLocalization(ContrastivePretrainer):
    """
    The InsLoc step for any encoder mapping (images, boxes) to per-level embeddings: query on
    the (augmented) query box, key on the true key box with shuffle-BN, one InfoNCE term and
    one queue per level, loss = sum_l w_l L_l. Subclasses build the encoder.

    Inputs: dicts with ``view_q``, ``view_k`` (3, S, S) uint8 and ``box_q``, ``box_k`` (4,) XYXY
    (see ``CopyPasteMapper``).
    """

    @configurable
    def __init__(
        self,
        *,
        encoder: nn.Module,
        in_features: Sequence[str],
        level_loss_weights: Sequence[float],
        box_aug_features: Sequence[str] = (),
        **kwargs,
    ):
        """
        Args:
            encoder: maps (N, 3, H, W) images and (N, 4) or (N, L, 4) boxes to
                {level: (N, D)} for the levels ``in_features``.
            in_features: the levels with a contrastive loss, in the encoder's order.
            level_loss_weights: w_l, one per level.
            box_aug_features: levels whose query box is the augmented one that the loader drew
                (``box_q_aug``, see ``CopyPasteMapper``); the others keep the true box. Empty:
                no box augmentation.
            kwargs: see :class:`ContrastivePretrainer`.
        """
        super().__init__(**kwargs)
        assert len(level_loss_weights) == len(in_features), "one loss weight per level"
        assert set(box_aug_features) <= set(in_features), f"{box_aug_features} not in {in_features}"
        self.in_features = list(in_features)
        self.level_loss_weights = dict(zip(in_features, level_loss_weights))
        self.encoder_q = encoder
        self.init_key_encoder()
        self.queues = nn.ModuleDict(
            {f: ContrastiveQueue(self.dim, self.queue_size) for f in self.in_features}
        )
        self.box_aug_features = [f for f in self.in_features if f in box_aug_features]
        terms = [
            ContrastTerm(f"insloc_{f}", f"loss_insloc_{f}", f, f, f"queues.{f}", w)
            for f, w in self.level_loss_weights.items()
        ]
        self.set_contrast_terms(terms, [(f, f"queues.{f}") for f in self.in_features])

    @classmethod
    def from_config(cls, cfg):
        i = cfg.MODEL.INSLOC
        return {
            "encoder": cls.build_encoder(cfg),
            "in_features": i.IN_FEATURES,
            "level_loss_weights": i.LEVEL_LOSS_WEIGHTS,
            "box_aug_features": i.BOX_AUG_FEATURES if i.BOX_AUG else (),
            # InsLoc composites get MoCo v2's photometric family, never RandAugment.
            **contrastive_args_from_config(cfg, randaugment=False),
        }

    @classmethod
    def build_encoder(cls, cfg) -> nn.Module:
        raise NotImplementedError

    def boxes(self, batched_inputs: List[Dict], key: str) -> torch.Tensor:
        """(N, 4) float boxes ``key`` of the inputs, on the model's device."""
        return self.stack(self.gather(batched_inputs, key)).float()

    def views_and_boxes(self, batched_inputs: List[Dict], side: str):
        """
        Returns:
            (N, 3, S, S) normalised ``view_<side>`` and their (N, 4) boxes ``box_<side>`` (both
            flipped when the photometric augmentation runs here), and for the query side with
            box augmentation (N, 2, 4): the true box and the augmented one that matches the
            flip (row 0 or 1 of ``box_q_aug``).
        """
        views = self.gather(batched_inputs, f"view_{side}")
        boxes = self.boxes(batched_inputs, f"box_{side}")
        if side == "k" or not self.box_aug_features:
            return self.preprocess_with_boxes(views, boxes)
        if "box_q_aug" not in batched_inputs[0]:
            raise KeyError(
                "InsLoc's box augmentation (MODEL.INSLOC.BOX_AUG) needs 'box_q_aug' in every "
                "sample: the loader's CopyPasteMapper draws it (AnchorBoxAugmentation)."
            )
        alternatives = self.boxes(batched_inputs, "box_q_aug")  # (N, 2, 4)
        return self.preprocess_with_boxes(
            views,
            torch.stack([boxes, alternatives[:, 0]], dim=1),
            boxes_if_flipped=torch.stack([boxes, alternatives[:, 1]], dim=1),
        )

    def query_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """
        Args:
            boxes: (N, 4) true query boxes, or (N, 2, 4) the true and the augmented one.
        Returns:
            (N, L, 4): the augmented box on ``box_aug_features`` (one draw per image, shared by
            those levels, as in the reference), the true box elsewhere.
        """
        if boxes.dim() == 2:
            return boxes_per_level(boxes, len(self.in_features))
        true, jittered = boxes.unbind(dim=1)
        per_level = [jittered if f in self.box_aug_features else true for f in self.in_features]
        return torch.stack(per_level, dim=1)

    def forward(self, batched_inputs: List[Dict]):
        """
        Training: ``{"loss_insloc_<level>": w_l * L_l}``. Inference: {level: (N, D)} query
        embeddings of the true boxes (``view_q``/``box_q``, or ``image`` and its whole extent).
        """
        if not self.training:
            return self.inference(batched_inputs)
        images_q, boxes_q = self.views_and_boxes(batched_inputs, "q")
        boxes_q = self.query_boxes(boxes_q)
        q = self.encoder_q(images_q, boxes_q)
        with torch.no_grad():
            self.momentum_update()  # before the key forward, as in MoCo
            k = self.encode_keys(*self.views_and_boxes(batched_inputs, "k"))
        return self.contrastive_losses(q, k)

    def inference(self, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        if "view_q" in batched_inputs[0]:
            images = self.preprocess(self.gather(batched_inputs, "view_q"))
            return self.encoder_q(images, self.boxes(batched_inputs, "box_q"))
        images = self.preprocess(self.gather(batched_inputs, "image"))
        h, w = images.shape[-2:]
        whole = torch.tensor([0.0, 0.0, w, h], device=self.device).expand(len(images), 4)
        return self.encoder_q(images, whole)
