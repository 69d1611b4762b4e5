"""
The transferable tensors of a checkpoint, in one naming whatever wrote the checkpoint:

    resnet.{stem,res2,res3,res4,res5}.*    a detectron2 ``ResNet`` (``res2.0.conv1.norm.weight``)
    fpn.fpn_{lateral,output}{2..5}.*       detectron2 ``FPN`` convs (``.norm.*`` when normalised)
    box_head.{conv1..,fc1..}.*             ``FastRCNNConvFCHead`` layers

:mod:`.formats` recognises a checkpoint and fills a :class:`Transferable`; :mod:`.converter`
places its groups in a detector.
"""

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch

__all__ = ["ConversionError", "Transferable", "KNOWN_META_ARCHITECTURES", "STAGES"]

# Meta-architecture -> layout of its query encoder. A checkpoint of another meta-architecture
# is refused: guessing is how converters end up writing nothing, silently.
KNOWN_META_ARCHITECTURES = {
    "MoCoV2": "resnet",
    "DetCo": "resnet",
    "InsLocC4": "resnet+res5",
    "InsLocFPN": "fpn+box_head",
}
STAGES = ("stem", "res2", "res3", "res4", "res5")


class ConversionError(ValueError):
    """The input is not a checkpoint we can convert, or converting it would write nothing."""


@dataclass
class Transferable:
    """
    The transferable tensors of a checkpoint in one naming.

    Attributes:
        tensors: ``resnet.*`` / ``fpn.*`` / ``box_head.*`` name -> tensor.
        origin: same names -> the source module they came from (for reports), e.g.
            ``module.encoder_q.layer1.``.
        left_out: rows ``(source prefix, #tensors, reason)``.
        format: the layout that was recognised, in words.
        meta_architecture: the pretraining meta-architecture whose layout this is (ours, or
            InsLocFPN / InsLocC4 for InstanceLoc's checkpoints); "" for a plain ResNet or a
            detector.
        consumed: the source keys taken or left out so far.
    """

    tensors: "OrderedDict[str, torch.Tensor]" = field(default_factory=OrderedDict)
    origin: Dict[str, str] = field(default_factory=dict)
    left_out: List[Tuple[str, int, str]] = field(default_factory=list)
    format: str = ""
    meta_architecture: str = ""
    consumed: set = field(default_factory=set, repr=False)

    @property
    def groups(self) -> List[str]:
        return sorted({k.split(".")[0] for k in self.tensors})

    def add_prefix(self, prefix: str):
        """Report source names with ``prefix`` (e.g. the ``module.`` of a DDP wrapper)."""
        self.origin = {k: prefix + v for k, v in self.origin.items()}
        self.left_out = [(prefix + p, n, r) for p, n, r in self.left_out]

    def take(self, name: str, tensor, origin: str, key: str):
        """Keep source ``key`` as ``name``; ``origin`` is its module, for reports."""
        if name in self.tensors:
            raise ConversionError(
                f"Two tensors of the checkpoint map to '{name}' ('{key}' and one from "
                f"'{self.origin[name]}'): ambiguous."
            )
        self.tensors[name] = torch.as_tensor(tensor)
        self.origin[name] = origin
        self.consumed.add(key)

    def leave(self, prefix: str, reason: str, key: str):
        """Report source ``key`` as left out, counted under ``prefix``."""
        self.consumed.add(key)
        for i, (p, count, r) in enumerate(self.left_out):
            if (p, r) == (prefix, reason):
                self.left_out[i] = (p, count + 1, r)
                return
        self.left_out.append((prefix, 1, reason))

    def leave_rest(self, state_dict: Dict, reasons: List[Tuple[str, str]]):
        """Every key not yet consumed is left out, counted under the first matching
        ``(prefix, reason)`` of ``reasons``, else under its first component as "not
        transferable"."""
        for k in state_dict:
            if k in self.consumed:
                continue
            prefix, reason = next(
                ((p, r) for p, r in reasons if k.startswith(p)),
                (k.split(".")[0] + ("." if "." in k else ""), "not transferable"),
            )
            self.leave(prefix, reason, k)
