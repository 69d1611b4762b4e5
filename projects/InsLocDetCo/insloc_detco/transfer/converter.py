"""
Any recognised checkpoint -> detectron2 model-zoo ``.pkl`` with its transferable tensors under
the names of the downstream detector.

:mod:`.formats` recognises the checkpoint (ours, MoCo, DenseCL / OpenSelfSup, InstanceLoc,
torchvision, detectron2) and names its transferable tensors ``resnet.*``, ``fpn.*``,
``box_head.*``; this module places them for a detector layout (``target``):

==================  ===================  ========================  ========================
group               ``any``              ``c4``                    ``fpn`` / ``retinanet``
==================  ===================  ========================  ========================
ResNet stem..res4   ``stem.*``,          ``backbone.*``            ``backbone.bottom_up.*``
                    ``res2.*``...
ResNet res5         ``res5.*``           ``roi_heads.res5.*``      ``backbone.bottom_up.*``
FPN convs           (left out)           (left out: no FPN)        ``backbone.fpn_*``
                                                                   (RetinaNet: P3-P5)
box head            (left out)           (left out)                ``roi_heads.box_head.*``
                                                                   (RetinaNet: left out)
==================  ===================  ========================  ========================

``any`` writes the layout-neutral names of a detectron2 ``ResNet`` (as MoCo's converter does):
detectron2's name matching (``matching_heuristics``, ``align_and_update_state_dicts``) finds
``res2.0.conv1.weight`` in ``backbone.res2.0.conv1.weight`` (C4),
``backbone.bottom_up.res2.0.conv1.weight`` (FPN, RetinaNet) and ``roi_heads.res5.*`` (C4), so
one file loads completely into every detector (without the BN ``num_batches_tracked`` counters,
as detectron2's ImageNet ``R-50.pkl``). It is the default for backbone-only sources;
InsLoc's FPN + box head and its C4 RoI head need the detector's own names (``fpn``, ``c4``).

:func:`.fitting.fit_to_detector` then keeps what a given detector uses: the ResNet must fit
completely (else an error), the FPN and the box head transfer whole or not at all (e.g.
InsLoc's 4conv1fc head is left out of DetCo's 2fc detectors).
"""

import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import yaml

from ..checkpoint import UnsafeWeightsError, load_weights_file
from .fitting import detector_resnet_keys, fit_to_detector
from .formats import normalise_state_dict, unwrap_checkpoint
from .model_zoo_file import AUTHOR, check_output_path, load_model_zoo_pkl, save_model_zoo_pkl
from .transferable import KNOWN_META_ARCHITECTURES, ConversionError, Transferable

__all__ = [
    "TARGETS",
    "AUTHOR",
    "KNOWN_META_ARCHITECTURES",
    "ConversionError",
    "Conversion",
    "load_pretrain_checkpoint",
    "convert_state_dict",
    "convert_transferable",
    "convert_checkpoint",
    "fit_to_detector",
    "detector_resnet_keys",
    "check_output_path",
    "save_model_zoo_pkl",
    "load_model_zoo_pkl",
    "target_of_config",
    "default_target",
]

TARGETS = ("any", "c4", "fpn", "retinanet")


@dataclass
class Conversion:
    """
    Result of a conversion.

    Attributes:
        model: detectron2 name -> tensor, in checkpoint order.
        written: rows ``(source prefix, destination prefix, #tensors, #values)``.
        left_out: rows ``(source prefix, #tensors, reason)``.
        meta_architecture: the pretraining meta-architecture ("" for a ResNet or a detector).
        target: the detector layout ("any", "c4", "fpn", "retinanet").
        source_format: the layout recognised in the input, in words.
    """

    model: "OrderedDict[str, torch.Tensor]"
    written: List[Tuple[str, str, int, int]] = field(default_factory=list)
    left_out: List[Tuple[str, int, str]] = field(default_factory=list)
    meta_architecture: str = ""
    target: str = ""
    source_format: str = ""

    def table(self) -> str:
        """A plain-text report of what was written and what was left out."""
        what = self.source_format or f"{self.meta_architecture} query encoder"
        where = "any detector" if self.target == "any" else f"a '{self.target}' detector"
        lines = [f"Converted {what} for {where}."]
        w = max([len(r[0]) + 1 for r in self.written + self.left_out] + [8])
        v = max([len(r[1]) + 1 for r in self.written] + [36])
        lines.append(f"{'written':<{w}}  {'as':<{v}} {'tensors':>7} {'values':>11}")
        for src, dst, n, numel in self.written:
            lines.append(f"{src + '*':<{w}}  {dst + '*':<{v}} {n:>7} {numel:>11,}")
        total = sum(r[3] for r in self.written)
        lines.append(f"{'total':<{w}}  {'':<{v}} {len(self.model):>7} {total:>11,}")
        lines.append(f"{'left out':<{w}}  {'reason':<{v}} {'tensors':>7}")
        for src, n, reason in self.left_out:
            lines.append(f"{src + '*':<{w}}  {reason:<{v}} {n:>7}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Reading inputs
# ------------------------------------------------------------------------------------------
def load_pretrain_checkpoint(path: str) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """
    Read a weights file of any recognised layout (see :mod:`.formats`).

    Args:
        path: a pretraining checkpoint (ours: ``model_final.pth``; MoCo's ``.pth.tar``; ...),
            a torchvision / released backbone, or a detectron2 model (``.pkl`` / ``.pth``).
    Returns:
        (state_dict, info): the state dict as stored (names unchanged) and ``info`` with
        ``meta_architecture`` (from ``config.yaml`` next to the checkpoint, else None),
        ``iteration``, ``source`` (absolute path) and ``container`` (see
        :func:`.formats.unwrap_checkpoint`).
    Raises:
        ConversionError: missing, unreadable, unsafe, or holding no tensors.
    """
    if not os.path.isfile(path):
        raise ConversionError(f"Checkpoint '{path}' does not exist.")
    if os.path.getsize(path) == 0:
        raise ConversionError(f"Checkpoint '{path}' is empty (0 bytes).")
    try:
        # A checkpoint is data: refuse to execute pickled code from it.
        obj = load_weights_file(path)
    except UnsafeWeightsError as e:
        raise ConversionError(str(e)) from None
    except Exception as e:
        raise ConversionError(
            f"Cannot read '{path}' as a PyTorch checkpoint or pickle: {type(e).__name__}: {e}"
        ) from e
    state_dict, container = unwrap_checkpoint(obj, path)
    info = {
        "meta_architecture": _meta_architecture_next_to(path),
        "iteration": container["iteration"],
        "source": os.path.abspath(path),
        "container": container,
    }
    return state_dict, info


def _meta_architecture_next_to(path: str) -> Optional[str]:
    config_file = os.path.join(os.path.dirname(os.path.abspath(path)), "config.yaml")
    if not os.path.isfile(config_file):
        return None
    with open(config_file) as f:
        # The dumped config is plain YAML; only one key is needed, so no config class.
        cfg = yaml.safe_load(f) or {}
    return (cfg.get("MODEL") or {}).get("META_ARCHITECTURE")


# ------------------------------------------------------------------------------------------
# Placing the groups
# ------------------------------------------------------------------------------------------
def _destination(name: str, target: str) -> Tuple[Optional[str], str]:
    """(detectron2 name of a ``resnet.*`` / ``fpn.*`` / ``box_head.*`` tensor in a ``target``
    detector, or None and the reason it has no place there)."""
    group, rel = name.split(".", 1)
    if group == "resnet":
        if target == "any":  # no BN counters: stock (frozen-BN) configs have none either
            return (None, "BN counters") if rel.endswith("num_batches_tracked") else (rel, "")
        if target == "c4":
            return ("roi_heads." if rel.startswith("res5.") else "backbone.") + rel, ""
        return "backbone.bottom_up." + rel, ""
    if group == "fpn":
        if target == "fpn":
            return "backbone." + rel, ""
        level = int(re.match(r"fpn_\w+?(\d+)\.", rel).group(1))
        if target == "retinanet":  # RetinaNet's FPN is built on res3..res5: no P2 convs
            return ("backbone." + rel, "") if level >= 3 else (None, "no P2 in RetinaNet")
        return None, {"c4": "C4 detector has no FPN", "any": "ResNet-only target"}[target]
    if group == "box_head":
        if target == "fpn":
            return "roi_heads.box_head." + rel, ""
        return None, {
            "c4": "C4 detector: res5 is the box head",
            "any": "ResNet-only target",
            "retinanet": "not in RetinaNet",
        }[target]
    raise AssertionError(name)


def convert_transferable(source: Transferable, target: str) -> Conversion:
    """Place the groups of ``source`` for a ``target`` detector (see the module doc)."""
    if target not in TARGETS:
        raise ConversionError(f"Unknown target '{target}'; choose one of {TARGETS}.")
    model: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    rows: "OrderedDict[Tuple[str, str], List[int]]" = OrderedDict()
    left: "OrderedDict[Tuple[str, str], int]" = OrderedDict()
    for name, tensor in source.tensors.items():
        dst, reason = _destination(name, target)
        if dst is None:
            counter = name.endswith("num_batches_tracked")  # one row for all BN counters
            key = ("*.num_batches_tracked", reason) if counter else (source.origin[name], reason)
            left[key] = left.get(key, 0) + 1
            continue
        model[dst] = tensor
        # One report row per module: "module.encoder_q.layer1." -> "backbone.res2."
        rel = name.split(".", 1)[1]
        dst_module = dst[: len(dst) - len(rel)] + rel.split(".")[0] + "."
        row = rows.setdefault((source.origin[name], dst_module), [0, 0])
        row[0] += 1
        row[1] += tensor.numel()
    if not model:
        raise ConversionError(
            f"Converting this {source.format} for a '{target}' detector would write no tensor."
        )
    return Conversion(
        model=model,
        written=[(s, d, n, numel) for (s, d), (n, numel) in rows.items()],
        left_out=[(p, n, r) for (p, r), n in left.items()] + list(source.left_out),
        meta_architecture=source.meta_architecture,
        target=target,
        source_format=source.format,
    )


def convert_state_dict(
    state_dict: Dict[str, torch.Tensor],
    target: str,
    meta_architecture: Optional[str] = None,
    container: Optional[Dict] = None,
) -> Conversion:
    """
    Args:
        state_dict: the tensors of a checkpoint of any recognised layout (:mod:`.formats`).
        target: "any", "c4", "fpn", "retinanet" or "auto" (:func:`default_target`).
        meta_architecture: for our pretraining checkpoints, ``MODEL.META_ARCHITECTURE``;
            None: inferred from the key layout.
        container: what surrounded the state dict in its file (see ``unwrap_checkpoint``).
    Returns:
        a :class:`Conversion`.
    Raises:
        ConversionError: unknown target or layout, an incomplete ResNet, nothing to write.
    """
    if target not in TARGETS + ("auto",):
        raise ConversionError(f"Unknown target '{target}'; choose one of {TARGETS}.")
    source = normalise_state_dict(state_dict, meta_architecture, container)
    if target == "auto":
        target = default_target(source.meta_architecture, source.groups)
    return convert_transferable(source, target)


def convert_checkpoint(path: str, target: str) -> Tuple[Conversion, Dict]:
    """:func:`load_pretrain_checkpoint` + :func:`convert_state_dict`; returns (conversion, info).
    ``target`` "auto" is :func:`default_target` of what the file holds."""
    state_dict, info = load_pretrain_checkpoint(path)
    conversion = convert_state_dict(
        state_dict, target, info["meta_architecture"], container=info["container"]
    )
    return conversion, info


def default_target(meta_architecture: str = "", groups: Iterable[str] = ()) -> str:
    """
    The layout ``convert`` writes by default: the detector's own names where a head needs them
    ("fpn" for an FPN or a box head, as InsLoc-FPN's; "c4" for InsLoc-C4's res5 RoI head),
    else the layout-neutral ResNet names ("any") that load into C4, FPN and RetinaNet
    detectors alike.

    Args:
        meta_architecture: of a pretraining checkpoint ("" for other sources).
        groups: the groups a :class:`.Transferable` holds ("resnet", "fpn", "box_head").
    """
    layout = KNOWN_META_ARCHITECTURES.get(meta_architecture, "")
    if layout.startswith("fpn") or {"fpn", "box_head"} & set(groups):
        return "fpn"
    return "c4" if layout == "resnet+res5" else "any"


def target_of_config(cfg) -> str:
    """The layout ("c4", "fpn", "retinanet") of the detector a detectron2 config builds."""
    if cfg.MODEL.META_ARCHITECTURE == "RetinaNet":
        return "retinanet"
    return "fpn" if "fpn" in cfg.MODEL.BACKBONE.NAME else "c4"
