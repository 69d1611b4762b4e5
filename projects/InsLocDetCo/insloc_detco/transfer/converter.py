"""
Pretraining checkpoint -> detectron2 model-zoo ``.pkl`` with the query encoder's transferable
tensors under the names of the downstream detector.

The pretraining models are built from detectron2's ``ResNet``, ``FPN`` and
``FastRCNNConvFCHead``, so converting is only re-prefixing:

=================================  ==========================  ===========================
query-encoder tensors              C4 detector (``c4``)        FPN detector (``fpn``)
=================================  ==========================  ===========================
ResNet ``stem``, ``res2..res4``    ``backbone.*``              ``backbone.bottom_up.*``
ResNet ``res5``                    ``roi_heads.res5.*``        ``backbone.bottom_up.res5.*``
FPN ``fpn_lateral*/fpn_output*``   (left out: no FPN)          ``backbone.fpn_*``
box head ``conv1..conv4``, ``fc1`` (left out: res5 head)       ``roi_heads.box_head.*``
=================================  ==========================  ===========================

RetinaNet (``retinanet``) takes the FPN layout without the box head and without P2 (its FPN
starts at res3). Where the query encoder keeps them:

* MoCo v2, DetCo: ``encoder_q.backbone.{stem,res2..res5}`` (a ResNet);
* InsLoc-C4: ``encoder_q.backbone.{stem,res2..res4}`` and ``encoder_q.res5``;
* InsLoc-FPN: ``encoder_q.backbone.bottom_up.*`` + ``encoder_q.backbone.fpn_*`` (an FPN) and
  ``encoder_q.box_head.{conv*,fc1}``.

Projection heads, the key encoder and the queues are left out. The target layout is chosen by
the benchmark (``eval_transfer.py run``) or by ``--target`` (``convert``): one ``.pkl`` holds
one layout, so no tensor can land in a wrong place by suffix matching.
"""

import logging
import os
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import yaml

from ..checkpoint import UnsafeWeightsError, load_weights_file

__all__ = [
    "TARGETS",
    "KNOWN_META_ARCHITECTURES",
    "ConversionError",
    "Conversion",
    "load_pretrain_checkpoint",
    "convert_state_dict",
    "convert_checkpoint",
    "save_model_zoo_pkl",
    "load_model_zoo_pkl",
    "target_of_config",
    "default_target",
]

logger = logging.getLogger(__name__)

TARGETS = ("c4", "fpn", "retinanet")

# Meta-architecture -> layout of its query encoder. A checkpoint of another meta-architecture
# is refused: guessing is how converters end up writing nothing, silently.
KNOWN_META_ARCHITECTURES = {
    "MoCoV2": "resnet",
    "DetCo": "resnet",
    "InsLocC4": "resnet+res5",
    "InsLocFPN": "fpn+box_head",
}

AUTHOR = "InsLocDetCo"
_Q = "encoder_q."
_STAGES = ("stem", "res2", "res3", "res4", "res5")
_FPN_LAYER = re.compile(r"^fpn_(lateral|output)(\d+)\.")
_BOX_HEAD_LAYER = re.compile(r"^(conv\d+|fc1)\.")


class ConversionError(ValueError):
    """The input is not a checkpoint we can convert, or converting it would write nothing."""


@dataclass
class Conversion:
    """
    Result of a conversion.

    Attributes:
        model: detectron2 name -> tensor, in checkpoint order.
        written: rows ``(source prefix, destination prefix, #tensors, #values)``.
        left_out: rows ``(source prefix, #tensors, reason)``.
        meta_architecture, target: what was converted, and for which detector layout.
    """

    model: "OrderedDict[str, torch.Tensor]"
    written: List[Tuple[str, str, int, int]] = field(default_factory=list)
    left_out: List[Tuple[str, int, str]] = field(default_factory=list)
    meta_architecture: str = ""
    target: str = ""

    def table(self) -> str:
        """A plain-text report of what was written and what was left out."""
        lines = [
            f"Converted {self.meta_architecture} query encoder for a '{self.target}' detector."
        ]
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
    Read a pretraining checkpoint written by ``DetectionCheckpointer`` and the run's config.

    Args:
        path: ``model_final.pth`` (or any ``model_*.pth``) of a pretraining run.
    Returns:
        (state_dict, info) where info has ``meta_architecture`` (from ``config.yaml`` next to
        the checkpoint, else None), ``iteration`` and ``source``.
    Raises:
        ConversionError: missing, unreadable, or not a state dict.
    """
    if not os.path.isfile(path):
        raise ConversionError(f"Checkpoint '{path}' does not exist.")
    if path.endswith(".pkl"):
        raise ConversionError(
            f"'{path}' is a .pkl: already a model-zoo file (give it to `run` as is), not a "
            "pretraining checkpoint to convert."
        )
    try:
        # A checkpoint is data: refuse to execute pickled code from it.
        ckpt = load_weights_file(path)
    except UnsafeWeightsError as e:
        raise ConversionError(str(e)) from None
    except Exception as e:
        raise ConversionError(
            f"Cannot read '{path}' as a PyTorch checkpoint: {type(e).__name__}: {e}"
        ) from e
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        state_dict = ckpt["model"]
    elif isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state_dict = ckpt  # a bare state dict
    else:
        raise ConversionError(f"'{path}' holds no state dict (expected a dict with 'model').")
    info = {
        "meta_architecture": _meta_architecture_next_to(path),
        "iteration": ckpt.get("iteration") if isinstance(ckpt, dict) else None,
        "source": os.path.abspath(path),
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


def _infer_meta_architecture(keys: List[str]) -> Optional[str]:
    """The meta-architecture whose query-encoder layout matches ``keys`` (no config.yaml)."""
    if any(k.startswith(_Q + "backbone.bottom_up.") for k in keys):
        return "InsLocFPN"
    if any(k.startswith(_Q + "res5.") for k in keys):
        return "InsLocC4"
    if any(k.startswith(_Q + "backbone.stem.") for k in keys):
        return "MoCoV2"  # MoCo v2 and DetCo share the ResNet layout; the heads are left out
    return None


# ------------------------------------------------------------------------------------------
# Conversion
# ------------------------------------------------------------------------------------------
def _source_groups(keys: List[str]) -> Dict[str, Dict[str, str]]:
    """
    Locate the transferable groups of the query encoder.

    Returns:
        group name -> {checkpoint key -> key relative to the group}; groups: "stem", "res2",
        ..., "res5", "fpn" (relative keys ``fpn_lateral2.weight``...), "box_head".
    """
    fpn_backbone = any(k.startswith(_Q + "backbone.bottom_up.") for k in keys)
    resnet_prefix = _Q + "backbone.bottom_up." if fpn_backbone else _Q + "backbone."
    groups: Dict[str, Dict[str, str]] = {}
    for k in keys:
        if k.startswith(resnet_prefix):
            rel = k[len(resnet_prefix) :]
            stage = rel.split(".")[0]
            if stage in _STAGES:
                groups.setdefault(stage, {})[k] = rel
        if k.startswith(_Q + "res5."):  # InsLoc-C4: res5 is the RoI head of the pretext task
            groups.setdefault("res5", {})[k] = "res5." + k[len(_Q + "res5.") :]
        if (
            fpn_backbone
            and k.startswith(_Q + "backbone.")
            and _FPN_LAYER.match(k[len(_Q + "backbone.") :])
        ):
            groups.setdefault("fpn", {})[k] = k[len(_Q + "backbone.") :]
        if k.startswith(_Q + "box_head.") and _BOX_HEAD_LAYER.match(k[len(_Q + "box_head.") :]):
            groups.setdefault("box_head", {})[k] = k[len(_Q + "box_head.") :]
    return groups


def _destination(group: str, rel: str, target: str) -> Optional[str]:
    """detectron2 name of a tensor of ``group`` in a ``target`` detector; None: no place."""
    if group in ("stem", "res2", "res3", "res4"):
        return ("backbone." if target == "c4" else "backbone.bottom_up.") + rel
    if group == "res5":
        return ("roi_heads." if target == "c4" else "backbone.bottom_up.") + rel
    if group == "fpn":
        if target == "fpn":
            return "backbone." + rel
        # RetinaNet's FPN is built on res3..res5: there is no P2 lateral/output conv.
        level = int(_FPN_LAYER.match(rel).group(2))
        return "backbone." + rel if target == "retinanet" and level >= 3 else None
    if group == "box_head":
        return "roi_heads.box_head." + rel if target == "fpn" else None
    raise AssertionError(group)


def _reason_left_out(key: str, target: str) -> str:
    if key.startswith("encoder_k."):
        return "key (momentum) encoder"
    if "queue" in key.split(".")[0]:
        return "negative-key queue"
    if key.startswith(_Q + "backbone.fpn_") or key.startswith(_Q + "box_head."):
        if key.startswith(_Q + "box_head.") and not _BOX_HEAD_LAYER.match(
            key[len(_Q + "box_head.") :]
        ):
            return "pretext fc layers after fc1"
        return {"c4": "C4 detector has no FPN / conv head", "retinanet": "not in RetinaNet"}.get(
            target, "no place in detector"
        )
    if key.startswith(_Q):
        return "projection / embedding head"
    return "not part of the query encoder"


def _left_out_prefix(key: str) -> str:
    """Report granularity: the whole key encoder, a query-encoder module, a top-level entry."""
    parts = key.split(".")
    depth = 1 if parts[0] != "encoder_q" else 3
    return ".".join(parts[:depth]) + "."


def convert_state_dict(
    state_dict: Dict[str, torch.Tensor], target: str, meta_architecture: Optional[str] = None
) -> Conversion:
    """
    Args:
        state_dict: a pretraining model's state dict (``encoder_q.*``, ``encoder_k.*``, ...).
        target: "c4", "fpn" or "retinanet": the layout of the downstream detector.
        meta_architecture: the pretraining meta-architecture (``MODEL.META_ARCHITECTURE``);
            None: inferred from the key layout.
    Returns:
        a :class:`Conversion`.
    Raises:
        ConversionError: unknown target or meta-architecture, a layout that does not match
            the meta-architecture, an incomplete ResNet, or nothing to write.
    """
    if target not in TARGETS:
        raise ConversionError(f"Unknown target '{target}'; choose one of {TARGETS}.")
    keys = list(state_dict.keys())
    if keys and all(k.startswith("module.") for k in keys):  # saved from a DDP wrapper
        state_dict = OrderedDict((k[len("module.") :], v) for k, v in state_dict.items())
        keys = list(state_dict.keys())
    if not any(k.startswith(_Q) for k in keys):
        sample = ", ".join(keys[:3]) or "(empty)"
        hint = (
            " It looks like a detectron2 detector checkpoint: use it as MODEL.WEIGHTS directly."
            if any(k.startswith(("backbone.", "roi_heads.")) for k in keys)
            else ""
        )
        raise ConversionError(
            "Not an InsLocDetCo pretraining checkpoint: no query-encoder tensors "
            f"('{_Q}*'); keys look like {sample}.{hint}"
        )
    if meta_architecture is None:
        meta_architecture = _infer_meta_architecture(keys)
        if meta_architecture is None:
            raise ConversionError(
                f"Unrecognised query-encoder layout (no ResNet under '{_Q}backbone.'), and no "
                "config.yaml next to the checkpoint says which method wrote it."
            )
        logger.warning(
            f"No config.yaml next to the checkpoint: the layout looks like {meta_architecture}."
        )
    if meta_architecture not in KNOWN_META_ARCHITECTURES:
        raise ConversionError(
            f"Don't know how to convert meta-architecture '{meta_architecture}'; known: "
            f"{', '.join(KNOWN_META_ARCHITECTURES)}."
        )

    groups = _source_groups(keys)
    _check_layout(groups, meta_architecture)

    model: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    rows: "OrderedDict[Tuple[str, str], List[int]]" = OrderedDict()
    placed = set()
    for group, members in groups.items():
        for key, rel in members.items():
            dst = _destination(group, rel, target)
            if dst is None:
                continue
            model[dst] = state_dict[key]
            placed.add(key)
            # One report row per module: "encoder_q.backbone.res2." -> "backbone.bottom_up.res2."
            module = rel.split(".")[0] + "."
            src_p = key[: len(key) - len(rel)] + module
            dst_p = dst[: len(dst) - len(rel)] + module
            row = rows.setdefault((src_p, dst_p), [0, 0])
            row[0] += 1
            row[1] += state_dict[key].numel()
    if not model:
        raise ConversionError(
            f"Converting this {meta_architecture} checkpoint for a '{target}' detector would "
            "write no tensor."
        )

    left: "OrderedDict[Tuple[str, str], int]" = OrderedDict()
    for key in keys:
        if key not in placed:
            row = (_left_out_prefix(key), _reason_left_out(key, target))
            left[row] = left.get(row, 0) + 1
    return Conversion(
        model=model,
        written=[(s, d, n, numel) for (s, d), (n, numel) in rows.items()],
        left_out=[(p, n, r) for (p, r), n in left.items()],
        meta_architecture=meta_architecture,
        target=target,
    )


def _check_layout(groups: Dict[str, Dict[str, str]], meta_architecture: str):
    """Refuse partial conversions: a missing stage would silently stay randomly initialised."""
    missing = [s for s in _STAGES if s not in groups]
    if missing:
        raise ConversionError(
            f"The {meta_architecture} query encoder lacks ResNet stage(s) {missing}: "
            "refusing a partial conversion."
        )
    layout = KNOWN_META_ARCHITECTURES[meta_architecture]
    if layout == "fpn+box_head" and not ({"fpn", "box_head"} <= set(groups)):
        raise ConversionError(
            f"Checkpoint says {meta_architecture} but has no FPN and box-head tensors "
            f"(found groups {sorted(groups)})."
        )
    if layout == "resnet+res5" and not any(
        k.startswith(_Q + "res5.") for k in groups.get("res5", {})
    ):
        raise ConversionError(f"Checkpoint says {meta_architecture} but has no '{_Q}res5.*'.")


def convert_checkpoint(path: str, target: str) -> Tuple[Conversion, Dict]:
    """:func:`load_pretrain_checkpoint` + :func:`convert_state_dict`; returns (conversion, info)."""
    state_dict, info = load_pretrain_checkpoint(path)
    conversion = convert_state_dict(state_dict, target, info["meta_architecture"])
    return conversion, info


def default_target(meta_architecture: str) -> str:
    """The detector layout a checkpoint transfers to most completely."""
    return "fpn" if KNOWN_META_ARCHITECTURES.get(meta_architecture, "").startswith("fpn") else "c4"


def target_of_config(cfg) -> str:
    """The layout ("c4", "fpn", "retinanet") of the detector a detectron2 config builds."""
    if cfg.MODEL.META_ARCHITECTURE == "RetinaNet":
        return "retinanet"
    return "fpn" if "fpn" in cfg.MODEL.BACKBONE.NAME else "c4"


# ------------------------------------------------------------------------------------------
# Model-zoo files
# ------------------------------------------------------------------------------------------
def save_model_zoo_pkl(conversion: Conversion, path: str, **extra):
    """
    Write ``{"model", "__author__", "matching_heuristics": True, ...}`` like detectron2's
    model zoo: numpy arrays, readable without torch. ``extra`` (e.g. source, iteration) is
    stored next to them; ``DetectionCheckpointer`` ignores unknown entries.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = {
        "model": OrderedDict((k, v.detach().cpu().numpy()) for k, v in conversion.model.items()),
        "__author__": AUTHOR,
        "matching_heuristics": True,
        "meta_architecture": conversion.meta_architecture,
        "target": conversion.target,
        **extra,
    }
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(data, f)
    os.replace(tmp, path)  # never leave a half-written file that looks converted


def load_model_zoo_pkl(path: str) -> Dict:
    """Read a model-zoo ``.pkl``; raises ConversionError if it is not one."""
    try:
        data = load_weights_file(path)
    except UnsafeWeightsError as e:
        raise ConversionError(str(e)) from None
    except Exception as e:
        raise ConversionError(f"Cannot read '{path}' as a pickle: {type(e).__name__}: {e}") from e
    if not (isinstance(data, dict) and "model" in data and "__author__" in data):
        raise ConversionError(
            f"'{path}' is not a detectron2 model-zoo file (no 'model' / '__author__')."
        )
    if not data["model"]:
        raise ConversionError(f"'{path}' holds no tensors.")
    if not all(isinstance(v, (np.ndarray, torch.Tensor)) for v in data["model"].values()):
        raise ConversionError(f"'{path}': 'model' does not map names to arrays.")
    return data
