"""
What a weights file holds, whoever wrote it: its layout is recognised from the tensor names and
its transferable tensors are renamed into a :class:`.Transferable` (the ResNet, FPN and box-head
groups under detectron2's module names); everything else is listed as left out, with the
reason. :mod:`.converter` then places the groups in a detector.

Recognised layouts (the file name and extension do not matter; ``module.`` is stripped):

=====================================  ==================================================
layout                                 tensor names
=====================================  ==================================================
InsLocDetCo pretraining checkpoint     ``encoder_q.backbone[.bottom_up].{stem,res2..}``,
                                       ``encoder_q.res5``, ``encoder_q.backbone.fpn_*``,
                                       ``encoder_q.box_head``
MoCo v1 / v2 (facebookresearch/moco)   ``state_dict``: ``module.encoder_q.{conv1,bn1,layer1..4,fc}``
DenseCL / OpenSelfSup pretraining      ``state_dict``: ``encoder_q.0.*`` (ResNet), ``encoder_q.1``
InstanceLoc (mmdet) R50-FPN            ``backbone.*``, ``neck.{lateral,fpn}_convs.i.{conv,bn}``,
                                       ``roi_head.bbox_head.shared_{convs,fcs}`` + ``backbone_k``
InstanceLoc (mmdet) R50-C4             ``backbone.*`` (layer1-3), ``roi_head.shared_head.layer4``
torchvision ResNet (and the released   ``conv1``, ``bn1``, ``layer1..4``, ``fc`` (bare, or in
DenseCL / DetCo / OpenSelfSup weights)  ``state_dict``), or under ``backbone.``
detectron2 models (``.pkl``/``.pth``)  ``stem.*``/``res2.*`` (layout-neutral ResNet),
                                       ``backbone.{stem,res2..}`` + ``roi_heads.res5`` (C4),
                                       ``backbone.bottom_up`` + ``backbone.fpn_*`` +
                                       ``roi_heads.box_head`` (FPN, RetinaNet)
=====================================  ==================================================

mmdetection and torchvision ResNets put the stride in the 3x3 conv: our recipes build
detectron2's ResNet with ``STRIDE_IN_1X1: False``, the same network. A checkpoint that holds two
candidate ResNets, an mmdetection detector that is not an InstanceLoc pretraining checkpoint,
Caffe2 (MSRA) names, or anything else is a :class:`ConversionError` saying what was found.
"""

import re
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from . import layouts
from .transferable import STAGES, ConversionError, Transferable

__all__ = ["unwrap_checkpoint", "normalise_state_dict"]

_CAFFE2 = re.compile(r"(conv1_w|res_conv1_bn_s|res\d_\d+_branch\w+)$")
_Q = "encoder_q."


# ------------------------------------------------------------------------------------------
# Containers
# ------------------------------------------------------------------------------------------
def _is_array(v) -> bool:
    return isinstance(v, (torch.Tensor, np.ndarray))


def unwrap_checkpoint(obj, path: str) -> Tuple[Dict, Dict]:
    """
    Args:
        obj: what :func:`insloc_detco.checkpoint.load_weights_file` read from ``path``.
    Returns:
        (state dict, container) where container has ``wrapper`` ("model", "state_dict",
        "blobs" or "" for a bare state dict), ``author`` (model-zoo ``__author__`` or a
        release's ``author``), ``iteration`` / ``epoch``, ``arch`` (MoCo) and ``meta_keys``
        (the top-level keys).
    Raises:
        ConversionError: no dict of tensors in it; the message says what there is.
    """
    if not isinstance(obj, dict):
        raise ConversionError(
            f"'{path}' holds a {type(obj).__name__}, not a checkpoint (a dict of tensors)."
        )
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    container = {
        "author": obj.get("__author__") or obj.get("author") or "",
        "iteration": obj.get("iteration", meta.get("iter")),
        "epoch": obj.get("epoch", meta.get("epoch")),
        "arch": obj.get("arch") if isinstance(obj.get("arch"), str) else "",
        "meta_keys": sorted(str(k) for k in obj),
    }
    for wrapper in ("model", "state_dict", "blobs"):
        inner = obj.get(wrapper)
        if isinstance(inner, dict) and any(_is_array(v) for v in inner.values()):
            return inner, {**container, "wrapper": wrapper}
    if obj and any(_is_array(v) for v in obj.values()):
        return obj, {**container, "wrapper": ""}
    nested = {k: type(v).__name__ for k, v in obj.items()}
    raise ConversionError(
        f"'{path}' holds no tensors: a dict with {_sample(list(nested.items()), 6)} "
        "(expected a state dict, or one under 'model' / 'state_dict')."
    )


def _sample(items, n: int = 4) -> str:
    items = list(items)
    shown = ", ".join(f"{name}: {what}" for name, what in items[:n])
    return (shown or "nothing") + (f", ... ({len(items)} in all)" if len(items) > n else "")


# ------------------------------------------------------------------------------------------
# Recognising the layout
# ------------------------------------------------------------------------------------------
def normalise_state_dict(
    state_dict: Dict, meta_architecture: Optional[str] = None, container: Optional[Dict] = None
) -> Transferable:
    """
    Args:
        state_dict: tensor (or numpy array) by name, in any recognised layout (module doc).
        meta_architecture: for our own checkpoints, ``MODEL.META_ARCHITECTURE`` of the run
            (None: inferred from the layout); ignored for other layouts.
        container: what :func:`unwrap_checkpoint` found around the state dict.
    Returns:
        a :class:`Transferable` with a complete ResNet (stem, res2..res5).
    Raises:
        ConversionError: an unrecognised or ambiguous layout, or an incomplete ResNet.
    """
    container = container or {}
    sd = OrderedDict((k, v) for k, v in state_dict.items() if _is_array(v))
    ddp = bool(sd) and all(k.startswith("module.") for k in sd)  # saved from a DDP wrapper
    if ddp:
        sd = OrderedDict((k[len("module.") :], v) for k, v in sd.items())

    _refuse_two_resnets(sd)
    out = _normalise_layout(sd, meta_architecture, container)
    if ddp:
        out.add_prefix("module.")
    missing = [s for s in STAGES if not any(k.startswith(f"resnet.{s}.") for k in out.tensors)]
    if missing:
        raise ConversionError(
            f"The {out.format} lacks ResNet stage(s) {missing}: refusing a partial conversion."
        )
    return out


def _normalise_layout(sd: Dict, meta_architecture: Optional[str], container: Dict) -> Transferable:
    """The layout's normaliser for state dict ``sd`` (DDP prefix removed), chosen from its names;
    a clear :class:`ConversionError` for what no normaliser reads."""

    def has(prefix):
        return any(k.startswith(prefix) for k in sd)

    if has(_Q + "backbone."):
        return layouts.normalise_ours(sd, meta_architecture)
    elif _Q + "conv1.weight" in sd:
        return layouts.normalise_moco(sd, container)
    elif _Q + "0.conv1.weight" in sd:
        return layouts.normalise_openselfsup(sd)
    elif "backbone.conv1.weight" in sd and has("backbone.layer1."):
        if has("neck.") or has("roi_head."):
            if not (has("backbone_k.") or has("queue")):
                raise ConversionError(
                    "An mmdetection detector ('backbone', 'neck' / 'roi_head') that is not an "
                    "InstanceLoc pretraining checkpoint (no momentum encoder 'backbone_k', no "
                    "queue): its head naming is ambiguous. Convert its ResNet alone: keep the "
                    "'backbone.*' tensors."
                )
            return layouts.normalise_instance_loc(sd)
        else:
            return layouts.normalise_torchvision(sd, "backbone.", container)
    elif "conv1.weight" in sd and has("layer1."):
        return layouts.normalise_torchvision(sd, "", container)
    elif any(
        has(p)
        for p in (
            "stem.",
            "res2.",
            "backbone.stem.",
            "backbone.res2.",
            "backbone.bottom_up.",
            "roi_heads.res5.",
        )
    ):
        return layouts.normalise_detectron2(sd, container)
    elif any(_CAFFE2.search(k) for k in sd):
        raise ConversionError(
            "Caffe2 / Detectron names (e.g. 'res2_0_branch2a_w'): an MSRA-style model with the "
            "stride in the 1x1 conv, not a torchvision-layout pretraining checkpoint."
        )
    elif has(_Q):
        raise ConversionError(
            f"Unrecognised query-encoder layout (no ResNet under '{_Q}backbone.', "
            f"'{_Q}layer1.' or '{_Q}0.'); keys look like {_sample(_shapes(sd))}."
        )
    else:
        raise ConversionError(
            f"Unrecognised weights: {len(sd)} tensors named like {_sample(_shapes(sd))}"
            + (f" (in '{container['wrapper']}')" if container.get("wrapper") else "")
            + ". Recognised: InsLocDetCo pretraining checkpoints, MoCo v1/v2, DenseCL / "
            "OpenSelfSup, InstanceLoc (mmdetection) FPN / C4, torchvision-layout ResNets, "
            "detectron2 models."
        )


def _refuse_two_resnets(sd: Dict):
    """Two different ResNets in one file (query branches, not a momentum copy): which one to
    transfer is a guess. Identical copies (DenseCL registers its ResNet twice) are fine."""
    stems = {
        k[: -len(stem)]: v
        for k, v in sd.items()
        for stem in ("stem.conv1.weight", "conv1.weight")
        if k.endswith(stem)
        and not k.startswith(("encoder_k.", "backbone_k."))
        and (
            stem == "stem.conv1.weight"
            or any(x.startswith(k[: -len(stem)] + "layer1.") for x in sd)
        )
    }
    prefixes = sorted(stems)
    first = torch.as_tensor(stems[prefixes[0]]) if prefixes else None
    if any(not torch.equal(torch.as_tensor(stems[p]), first) for p in prefixes):
        where = ", ".join(f"'{p or '(top level)'}'" for p in prefixes)
        raise ConversionError(f"Two different ResNets in one file (under {where}): ambiguous.")


def _shapes(sd: Dict) -> List[Tuple[str, str]]:
    return [(k, "x".join(map(str, v.shape)) or "scalar") for k, v in sd.items()]
