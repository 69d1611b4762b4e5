"""
Weights against a detectron2 model, by state-dict name.

* :func:`fit_to_detector`: keep, of a conversion, what a given detector uses, so that every
  written tensor loads: the ResNet must fit completely (else an error: another depth or block
  type than the config's), the FPN and the box head transfer whole or not at all. A pretrained
  group is only placed in the same architecture: InsLoc's 4conv1fc box head (with BN) is left
  out of a detector whose box head is the standard 2fc one (DetCo's protocol), an FPN with BN
  out of an FPN without norm.
* :func:`match_weights`: the one rule by which a weights file is loaded into a model, a
  detector to fine-tune or the readout network: detectron2's names (with its matching
  heuristics where the file asks for them), no tensor of another shape, the whole ResNet.
"""

import dataclasses
import logging
import re
from collections import OrderedDict
from typing import Dict, Iterable, List

import torch
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts

from .config import quiet_logger
from .transferable import ConversionError

__all__ = [
    "fit_to_detector",
    "detector_resnet_keys",
    "WeightsMatch",
    "match_weights",
    "match_model_zoo_file",
]

logger = logging.getLogger(__name__)

# Where a detector keeps each group (model state-dict names).
_DETECTOR_RESNET = re.compile(r"(backbone\.(bottom_up\.)?(stem|res[2-5])|roi_heads\.res5\.\d+)\.")
_DETECTOR_FPN_LAYER = re.compile(r"backbone\.(fpn_(lateral|output)\d+)\.")
_DETECTOR_BOX_LAYER = re.compile(r"roi_heads\.box_head\.((conv|fc)(\d+))\.")


def detector_resnet_keys(model_state: Dict[str, torch.Tensor]) -> List[str]:
    """The tensors of a detector's ResNet (stem, res2..res5, wherever the layout keeps them),
    without the ``num_batches_tracked`` counters."""
    return [
        k
        for k in model_state
        if _DETECTOR_RESNET.match(k) and not k.endswith("num_batches_tracked")
    ]


def _layers(names: Iterable[str], pattern) -> Dict[str, set]:
    """layer -> tensor suffixes (``num_batches_tracked`` aside: a counter, not a weight)."""
    layers: Dict[str, set] = {}
    for k in names:
        m = pattern.match(k)
        if m and not k.endswith("num_batches_tracked"):
            layers.setdefault(m.group(1), set()).add(k[m.end() :])
    return layers


def _shape_mismatch(names, model, model_state) -> List[str]:
    return [
        f"{k}: {tuple(model[k].shape)} vs {tuple(model_state[k].shape)} in the detector"
        for k in names
        if k in model_state and tuple(model[k].shape) != tuple(model_state[k].shape)
    ]


def _describe_box_head(layers: Dict[str, set]) -> str:
    convs = sorted((n for n in layers if n.startswith("conv")), key=lambda n: int(n[4:]))
    fcs = sorted((n for n in layers if n.startswith("fc")), key=lambda n: int(n[2:]))
    return f"{len(convs)} conv + {len(fcs)} fc layers" + (
        " with norm" if any("norm.weight" in s for s in layers.values()) else ""
    )


def _group_problem(group: str, model, model_state) -> str:
    """Why the ``group`` ("fpn" or "box_head") of ``model`` does not fit; "" if it does."""
    pattern = _DETECTOR_FPN_LAYER if group == "fpn" else _DETECTOR_BOX_LAYER
    ours, theirs = _layers(model, pattern), _layers(model_state, pattern)
    if group == "fpn" and set(ours) != set(theirs):
        return f"the detector's FPN has layers {sorted(theirs)}, the checkpoint's {sorted(ours)}"
    if group == "box_head":
        convs = {n for n in ours if n.startswith("conv")}
        fcs = {n for n in ours if n.startswith("fc")}
        if convs != {n for n in theirs if n.startswith("conv")} or not fcs <= set(theirs):
            return (
                f"this detector's box head has {_describe_box_head(theirs)}, the pretrained "
                f"one {_describe_box_head(ours)}"
            )
    for layer, suffixes in ours.items():
        if suffixes == theirs.get(layer):
            continue
        if layer not in theirs:
            return f"the detector has no {layer}"
        normed = [any(s.startswith("norm.") for s in x) for x in (suffixes, theirs[layer])]
        if normed[0] != normed[1]:
            return f"the pretrained {layer} has {'a' if normed[0] else 'no'} norm, the " + (
                f"detector's {'has' if normed[1] else 'has none'}"
            )
        return f"{layer} has tensors {sorted(suffixes)}, the detector's {sorted(theirs[layer])}"
    shapes = _shape_mismatch(model, model, model_state)
    return f"shapes differ ({shapes[0]})" if shapes else ""


def fit_to_detector(conversion, model_state: Dict[str, torch.Tensor]):
    """
    Keep what a detector uses, so that every written tensor loads.

    Args:
        conversion: a :class:`.converter.Conversion` for the detector's layout (``c4``,
            ``fpn`` or ``retinanet``).
        model_state: the detector's ``state_dict()``.
    Returns:
        the conversion without the FPN / box head if they do not fit the detector (moved to
        ``left_out`` with the reason). ``num_batches_tracked`` counters are not required (a
        frozen-BN detector has none; detectron2 ignores them).
    Raises:
        ConversionError: the ResNet does not fit completely (missing, extra or reshaped
            tensors: another depth or block type than the config's).
    """
    model = conversion.model
    ours = [k for k in model if _DETECTOR_RESNET.match(k)]
    problems = [
        f"{k} has no place in the detector"
        for k in ours
        if k not in model_state and not k.endswith("num_batches_tracked")
    ]
    problems += [
        f"the detector's {k} is not in the checkpoint"
        for k in detector_resnet_keys(model_state)
        if k not in model
    ]
    problems += _shape_mismatch(ours, model, model_state)
    if problems:
        raise ConversionError(
            f"The {conversion.source_format}'s ResNet does not fit this detector "
            f"({len(problems)} problems, e.g. {'; '.join(problems[:3])}): is it a ResNet-50 "
            "like the config's?"
        )
    written, left_out = list(conversion.written), list(conversion.left_out)
    for group, prefix in (("fpn", "backbone.fpn_"), ("box_head", "roi_heads.box_head.")):
        members = OrderedDict((k, v) for k, v in model.items() if k.startswith(prefix))
        reason = _group_problem(group, members, model_state) if members else ""
        if reason:
            logger.warning(f"Not transferring the pretrained {group}: {reason}.")
            model = OrderedDict((k, v) for k, v in model.items() if k not in members)
            left_out += [(s, n, reason) for s, d, n, _ in written if d.startswith(prefix)]
            written = [r for r in written if not r[1].startswith(prefix)]
    return dataclasses.replace(conversion, model=model, written=written, left_out=left_out)


@dataclasses.dataclass
class WeightsMatch:
    """
    Attributes:
        loaded: name -> tensor of what loads into the model (its names, its shapes).
        unused: tensors of the weights the model has no place for (counters aside).
        missing: tensors of the model the weights leave at their initialisation (counters
            aside).
    """

    loaded: Dict[str, torch.Tensor]
    unused: List[str]
    missing: List[str]


def match_weights(
    model_state: Dict[str, torch.Tensor],
    weights: Dict,
    source: str,
    model: str,
    *,
    heuristics: bool = False,
    caffe2: bool = False,
    allow_unused: bool = False,
) -> WeightsMatch:
    """
    Match ``weights`` to a model the way ``DetectionCheckpointer`` will load them.

    Args:
        model_state: the model's ``state_dict()``.
        weights: name -> tensor or array, detectron2 names.
        source: the file, for messages; model: what it is loaded into, for messages
            (e.g. "the detector of this benchmark").
        heuristics, caffe2: match names with detectron2's ``align_and_update_state_dicts``
            (what a model-zoo file with ``matching_heuristics`` asks for).
        allow_unused: tensors the model has no place for are left out (else an error).
    Raises:
        ConversionError: a tensor has another shape than the model's, would be unused (unless
            ``allow_unused``), or the model's ResNet would stay partly randomly initialised.
    """
    state = {k: torch.as_tensor(v) for k, v in weights.items()}
    if heuristics:
        # Its table of matches is printed again when the model loads the weights.
        with quiet_logger("detectron2.checkpoint.c2_model_loading"):
            state = align_and_update_state_dicts(model_state, state, c2_conversion=caffe2)
    wrong = [k for k in state if k in model_state and state[k].shape != model_state[k].shape]
    if wrong:
        k = wrong[0]
        raise ConversionError(
            f"{len(wrong)} tensors of '{source}' do not fit {model}, e.g. {k}: "
            f"{tuple(state[k].shape)} vs {tuple(model_state[k].shape)} (is it a ResNet-50 like "
            "the config's?)."
        )
    counter = "num_batches_tracked"
    loaded = {k: v for k, v in state.items() if k in model_state}
    unused = [k for k in state if k not in loaded and not k.endswith(counter)]
    if unused and not allow_unused:
        raise ConversionError(
            f"{len(unused)} tensors of '{source}' would not be used by {model}, e.g. "
            f"{unused[0]} (no such tensor): give the checkpoint itself, it is converted for "
            "each layout."
        )
    missing = [k for k in model_state if k not in loaded and not k.endswith(counter)]
    resnet = set(detector_resnet_keys(model_state))
    missing_resnet = [k for k in missing if k in resnet]
    if missing_resnet:
        raise ConversionError(
            f"'{source}' leaves {len(missing_resnet)} tensors of the ResNet of {model} randomly "
            f"initialised, e.g. {missing_resnet[0]}: refusing a partly random backbone."
        )
    return WeightsMatch(loaded, unused, missing)


def match_model_zoo_file(model_state, data: Dict, source: str, model: str, **kwargs):
    """:func:`match_weights` of a loaded model-zoo ``.pkl`` (``load_model_zoo_pkl``), with the
    name matching the file asks for; ``kwargs``: ``allow_unused``."""
    heuristics = bool(data.get("matching_heuristics", False))
    caffe2 = data.get("__author__") == "Caffe2"
    return match_weights(
        model_state, data["model"], source, model, heuristics=heuristics, caffe2=caffe2, **kwargs
    )
