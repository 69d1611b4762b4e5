"""MoCo v2 on a detectron2 ResNet (Chen et al. 2020): the baseline of InsLoc and DetCo."""

from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from torch import nn

from ..contrastive import ContrastiveQueue
from ..heads import GlobalEmbeddingHead
from .base import ContrastivePretrainer, ContrastTerm, contrastive_args_from_config

__all__ = ["MoCoV2", "GlobalEncoder"]


class GlobalEncoder(nn.Module):
    """backbone -> feature ``in_feature`` -> avgpool -> MLP -> unit-norm embedding."""

    def __init__(self, backbone: Backbone, head: nn.Module, in_feature: str):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.in_feature = in_feature

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, D) embeddings."""
        return self.head(self.backbone(images)[self.in_feature])


@META_ARCH_REGISTRY.register()
class MoCoV2(ContrastivePretrainer):
    """
    Image-level instance discrimination: two augmented views of an image, the query through
    ``encoder_q`` and the key through the momentum ``encoder_k``, one queue of negatives.
    Inputs: dicts with ``view_q`` and ``view_k`` (3, S, S) uint8 RGB (see ``MoCoV2Mapper``).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        in_feature: str,
        mlp_hidden_dim: int,
        mlp_norm: str = "",
        **kwargs,
    ):
        """
        Args:
            backbone: a detectron2 backbone (ResNet) whose outputs include ``in_feature``.
            in_feature: the feature map the embedding is pooled from ("res5").
            mlp_hidden_dim: hidden width of the projection MLP.
            mlp_norm: its normalisation ("" or "BN", see ``ProjectionMLP``).
            kwargs: see :class:`ContrastivePretrainer`.
        """
        super().__init__(**kwargs)
        channels = backbone.output_shape()[in_feature].channels
        head = GlobalEmbeddingHead(channels, mlp_hidden_dim, self.dim, mlp_norm)
        self.encoder_q = GlobalEncoder(backbone, head, in_feature)
        self.init_key_encoder()
        self.queue = ContrastiveQueue(self.dim, self.queue_size)
        self.set_contrast_terms(
            [ContrastTerm("moco", "loss_contrast", "moco", "moco", "queue")], [("moco", "queue")]
        )

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
        return {
            "backbone": backbone,
            "in_feature": cfg.MODEL.RESNETS.OUT_FEATURES[-1],
            "mlp_hidden_dim": cfg.MODEL.CONTRAST.MLP_HIDDEN_DIM,
            "mlp_norm": cfg.MODEL.CONTRAST.MLP_NORM,
            **contrastive_args_from_config(cfg),
        }

    def forward(self, batched_inputs: List[Dict]):
        """
        Training: returns ``{"loss_contrast": loss}``. Inference: (N, D) query embeddings of
        ``view_q`` (or ``image``).
        """
        if not self.training:
            key = "view_q" if "view_q" in batched_inputs[0] else "image"
            return self.encoder_q(self.preprocess(self.gather(batched_inputs, key)))
        q = self.encoder_q(self.preprocess(self.gather(batched_inputs, "view_q")))
        with torch.no_grad():
            self.momentum_update()  # before the key forward, as in MoCo
            k = self.encode_keys(self.preprocess(self.gather(batched_inputs, "view_k")))
        return self.contrastive_losses({"moco": q}, {"moco": k})
