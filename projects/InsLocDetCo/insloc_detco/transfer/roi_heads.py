"""
Heads of the fine-tuning recipes, registered in detectron2's registries so that the transfer
configs also run with detectron2's stock ``DefaultTrainer`` / ``tools/train_net.py`` once
``insloc_detco.transfer`` is imported.

Both add one normalisation layer where pretrained features enter the task-specific layers.
Self-supervised features are not scaled like supervised ones; MoCo (He et al. 2020, Sec. 4.2,
"feature normalization") therefore fine-tunes with trained, synchronised BN everywhere, and
InsLoc (Yang et al. 2021, Sec. 5.3) "inserts an additional batch normalization layer after the
last residual block" of the R50-C4 detector. With it the supervised recipe (lr 0.02, batch 16)
is used unchanged.
"""

import torch.nn as nn
from detectron2.config import configurable
from detectron2.layers import get_norm
from detectron2.modeling.roi_heads import (
    ROI_BOX_HEAD_REGISTRY,
    ROI_HEADS_REGISTRY,
    FastRCNNConvFCHead,
    Res5ROIHeads,
)

__all__ = ["ExtraNormRes5ROIHeads", "ExtraNormConvFCHead"]


@ROI_HEADS_REGISTRY.register()
class ExtraNormRes5ROIHeads(Res5ROIHeads):
    """
    ``Res5ROIHeads`` whose res5 ends with one more norm layer (``cfg.MODEL.RESNETS.NORM``):
    ``roi_heads.res5 = [block0, block1, block2, norm]``. The pretrained blocks keep their names
    (``roi_heads.res5.{0,1,2}.*``), so converted checkpoints load unchanged; ``res5.norm`` is
    new. It feeds both the box predictor and, in Mask R-CNN C4, the mask head.
    """

    @classmethod
    def _build_res5_block(cls, cfg):
        res5, out_channels = super()._build_res5_block(cfg)
        res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return res5, out_channels


@ROI_BOX_HEAD_REGISTRY.register()
class ExtraNormConvFCHead(FastRCNNConvFCHead):
    """
    ``FastRCNNConvFCHead`` ("4conv1fc" in the FPN recipes) with a norm layer after the last
    fc + ReLU (``cfg.MODEL.ROI_BOX_HEAD.NORM``, the norm of the convs). Layer names are those
    of ``FastRCNNConvFCHead`` (``conv1..conv4``, ``fc1``) so InsLoc-FPN's pretrained box head
    loads into it; ``fc_norm`` is new. This follows InsLoc's released FPN fine-tuning recipe
    for InsLoc checkpoints (Yang et al. 2021; ``R_50_FPN_1x_insloc.yaml``), which normalises
    the fc output as well as the convs; for other checkpoints that recipe has no norm after fc1
    (:mod:`.box_head_choice`).
    """

    @configurable
    def __init__(self, input_shape, *, fc_norm: str = "", **kwargs):
        """
        Args:
            fc_norm: norm after the last fc layer (see :func:`detectron2.layers.get_norm`);
                "" adds none, and the head is a plain ``FastRCNNConvFCHead``.
            input_shape, kwargs: see ``FastRCNNConvFCHead``.
        """
        super().__init__(input_shape, **kwargs)
        if fc_norm and self.fcs:
            fc_dim = self.fcs[-1].out_features
            # detectron2's norms (BN, naiveSyncBN, ...) are 2D: view the (N, C) vector as
            # (N, C, 1, 1) around the norm. Appended to the Sequential, so forward is unchanged.
            self.add_module("fc_unflatten", nn.Unflatten(1, (fc_dim, 1, 1)))
            self.add_module("fc_norm", get_norm(fc_norm, fc_dim))
            self.add_module("fc_flatten", nn.Flatten())

    @classmethod
    def from_config(cls, cfg, input_shape):
        return {**super().from_config(cfg, input_shape), "fc_norm": cfg.MODEL.ROI_BOX_HEAD.NORM}
