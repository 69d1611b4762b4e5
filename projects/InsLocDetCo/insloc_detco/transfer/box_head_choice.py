"""
InsLoc's FPN protocol chooses the box head by the source of the weights.

InstanceLoc's released fine-tuning configs (github.com/limbo0000/InstanceLoc,
``transfer/detection/configs``) give every FPN detector a 4conv1fc box head with BN after
each conv, and add one more norm after fc1 only for InsLoc checkpoints:

- ``R_50_FPN_1x_insloc.yaml`` (``FastRCNNConvFCHeadExtraNorm``): InsLoc weights, whose
  pretrained 4conv1fc head transfers into the detector;
- ``R_50_FPN_1x_pretrained.yaml`` (``FastRCNNConvFCHead``, no norm after fc1): any other
  pretraining; the MoCo v2 row of InsLoc's FPN table (Table 4c, 39.8 AP) was measured so.

Our InsLoc FPN recipes name the first (``ExtraNormConvFCHead``); :func:`box_head_for_weights`
turns it into the second (``FastRCNNConvFCHead``, the layers otherwise the same) when the
weights bring no pretrained box head that this detector takes: MoCo v2, DetCo, InsLoc-C4,
torchvision or ``random``. The choice is in the trial's ``config.yaml`` like any other key;
``MODEL.ROI_BOX_HEAD.NAME`` given on the command line is kept as given.
"""

import functools
import logging
import os
import re
from typing import Sequence

from .converter import load_pretrain_checkpoint
from .formats import normalise_state_dict

__all__ = ["FC_NORM_HEAD", "PLAIN_HEAD", "pretrained_box_head_fits", "box_head_for_weights"]

logger = logging.getLogger(__name__)

FC_NORM_HEAD = "ExtraNormConvFCHead"  # roi_heads.py: FastRCNNConvFCHead + norm after fc1
PLAIN_HEAD = "FastRCNNConvFCHead"
_LAYER = re.compile(r"box_head\.((conv|fc)\d+)\.")


@functools.lru_cache(maxsize=8)
def _box_head_layers(path: str, mtime_ns: int, size: int) -> frozenset:
    """Layer names (``conv1``, ``fc1``...) of the pretrained box head in a weights file
    (cached per file version: every benchmark of a run asks about the same file)."""
    state_dict, info = load_pretrain_checkpoint(path)
    source = normalise_state_dict(state_dict, info["meta_architecture"], info["container"])
    return frozenset(m.group(1) for m in map(_LAYER.match, source.tensors) if m)


def pretrained_box_head_fits(weights: str, num_conv: int, num_fc: int) -> bool:
    """
    Whether ``weights`` (a checkpoint, or "random") bring a box head that a ``num_conv`` conv +
    ``num_fc`` fc head takes: the same convs, fc layers among its own (the rule of
    :func:`.fitting.fit_to_detector`; InsLoc-FPN's conv1..conv4 + fc1 in a 4conv1fc head).
    """
    if not weights or not os.path.isfile(weights):
        return False  # "random": nothing pretrained
    stat = os.stat(weights)
    layers = _box_head_layers(os.path.abspath(weights), stat.st_mtime_ns, stat.st_size)
    convs = {n for n in layers if n.startswith("conv")}
    fcs = {n for n in layers if n.startswith("fc")}
    return (
        bool(layers)
        and convs == {f"conv{i + 1}" for i in range(num_conv)}
        and fcs <= {f"fc{i + 1}" for i in range(num_fc)}
    )


def box_head_for_weights(cfg, weights: str, opts: Sequence[str] = ()):
    """
    Args:
        cfg: a benchmark's config (not frozen).
        weights: what ``eval_transfer.py run`` was given (a checkpoint path or "random").
        opts: the command-line overrides; a ``MODEL.ROI_BOX_HEAD.NAME`` among them wins.
    Returns:
        ``cfg``, with ``MODEL.ROI_BOX_HEAD.NAME`` set to ``FastRCNNConvFCHead`` if the recipe
        names ``ExtraNormConvFCHead`` and the weights bring no box head it takes (a copy;
        ``cfg`` itself is returned unchanged otherwise).
    """
    head = cfg.MODEL.ROI_BOX_HEAD
    if head.NAME != FC_NORM_HEAD or "MODEL.ROI_BOX_HEAD.NAME" in list(opts)[::2]:
        return cfg
    if pretrained_box_head_fits(weights, head.NUM_CONV, head.NUM_FC):
        logger.info(
            f"Box head {FC_NORM_HEAD} (norm after fc1): the weights bring InsLoc's "
            "pretrained box head (InstanceLoc's R_50_FPN_*_insloc.yaml)."
        )
        return cfg
    logger.info(
        f"Box head {PLAIN_HEAD} (no norm after fc1): the weights bring no pretrained "
        "box head (InstanceLoc's R_50_FPN_*_pretrained.yaml)."
    )
    cfg = cfg.clone()
    cfg.MODEL.ROI_BOX_HEAD.NAME = PLAIN_HEAD
    return cfg
