"""
The layouts :mod:`.formats` recognises, each normalised into a :class:`.Transferable`: which
tensors transfer, under which name, and why the others do not. One function per layout; the
names follow each project's code (torchvision / mmdetection ResNets: ``conv1``, ``bn1``,
``layer1..4``, ``downsample.{0,1}``; mmcv ``ConvModule``: ``conv``, ``bn``).
"""

import re
from typing import Dict, Optional

from .transferable import KNOWN_META_ARCHITECTURES, STAGES, ConversionError, Transferable

__all__ = [
    "normalise_ours",
    "normalise_moco",
    "normalise_openselfsup",
    "normalise_instance_loc",
    "normalise_torchvision",
    "normalise_detectron2",
]

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
# A detectron2 ResNet tensor relative to the ResNet (convs have no bias: they are normalised).
_D2_RESNET = re.compile(rf"(stem\.conv1|res[2-5]\.\d+\.(conv[1-3]|shortcut))\.(weight|norm\.{_BN})")
_D2_FPN = re.compile(rf"fpn_(lateral|output)([2-6])\.(weight|bias|norm\.{_BN})")
_D2_BOX_LAYER = re.compile(rf"(conv\d+)\.(weight|bias|norm\.{_BN})|(fc\d+)\.(weight|bias)")
# mmdetection FPN neck input channels -> detectron2 level (res2..res5 of a ResNet-50).
_LEVEL_OF_CHANNELS = {256: 2, 512: 3, 1024: 4, 2048: 5}
_Q = "encoder_q."


# ------------------------------------------------------------------------------------------
# Renaming a ResNet
# ------------------------------------------------------------------------------------------
def _torchvision_to_detectron2(rel: str) -> Optional[str]:
    """``layer1.0.bn2.weight`` -> ``res2.0.conv2.norm.weight``; None if not a ResNet tensor."""
    if rel == "conv1.weight":
        return "stem.conv1.weight"
    m = re.fullmatch(rf"bn1\.{_BN}", rel)
    if m:
        return f"stem.conv1.norm.{m.group(1)}"
    m = re.fullmatch(r"layer([1-4])\.(\d+)\.(.+)", rel)
    if not m:
        return None
    block, sub = f"res{int(m.group(1)) + 1}.{m.group(2)}.", m.group(3)
    for pattern, repl in (
        (r"conv([1-3])\.weight", r"conv\1.weight"),
        (rf"bn([1-3])\.{_BN}", r"conv\1.norm.\2"),
        (r"downsample\.0\.weight", "shortcut.weight"),
        (rf"downsample\.1\.{_BN}", r"shortcut.norm.\1"),
    ):
        if re.fullmatch(pattern, sub):
            return block + re.sub(pattern, repl, sub)
    return None


def _take_torchvision_resnet(out: Transferable, sd: Dict, prefix: str, classifier: str):
    """The torchvision-named ResNet under ``prefix`` (``fc`` is left out as ``classifier``)."""
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue
        rel = k[len(prefix) :]
        name = _torchvision_to_detectron2(rel)
        if name is not None:
            module = rel.split(".")[0]
            module = "{conv1,bn1}" if module in ("conv1", "bn1") else module
            out.take("resnet." + name, v, prefix + module + ".", k)
        elif rel.startswith("fc."):
            out.leave(prefix + "fc.", classifier, k)
        elif re.match(r"(conv1|bn1|layer\d)\.", rel):
            raise ConversionError(
                f"'{k}' is not a tensor of a torchvision-layout ResNet (conv1, bn1, layer1-4 "
                "of bottleneck or basic blocks): another block type or an extra module."
            )


def _take_detectron2_resnet(out: Transferable, sd: Dict, prefix: str, stages=STAGES):
    """The detectron2-named ResNet stages ``stages`` under ``prefix``."""
    for k, v in sd.items():
        rel = k[len(prefix) :]
        if not k.startswith(prefix) or rel.split(".")[0] not in stages:
            continue
        if _D2_RESNET.fullmatch(rel):
            out.take("resnet." + rel, v, prefix + rel.split(".")[0] + ".", k)
        elif rel.startswith("stem.fc."):  # MoCo's converter renames encoder_q.fc to stem.fc
            out.leave(prefix + "stem.fc.", "projection head (stem.fc: MoCo's converter)", k)
        else:
            raise ConversionError(f"'{k}' is not a tensor of a detectron2 ResNet.")


def _conv_module(rel: str) -> Optional[str]:
    """mmcv ``ConvModule`` tensor -> detectron2 ``Conv2d`` suffix (conv.weight -> weight,
    bn.* -> norm.*); None if not one (another norm type, say)."""
    m = re.fullmatch(rf"conv\.(weight|bias)|bn\.{_BN}", rel)
    if not m:
        return None
    return m.group(1) or "norm." + m.group(2)


# ------------------------------------------------------------------------------------------
# The layouts
# ------------------------------------------------------------------------------------------
def normalise_ours(sd: Dict, meta_architecture: Optional[str]) -> Transferable:
    """Our pretraining checkpoints: the query encoder ``encoder_q`` of the meta-architecture
    (its ResNet, InsLoc-C4's ``res5`` RoI head, InsLoc-FPN's FPN and 4conv1fc box head)."""
    out = Transferable()
    fpn_backbone = any(k.startswith(_Q + "backbone.bottom_up.") for k in sd)
    _take_detectron2_resnet(out, sd, _Q + ("backbone.bottom_up." if fpn_backbone else "backbone."))
    _take_detectron2_resnet(out, sd, _Q, stages=("res5",))  # InsLoc-C4: res5 is the RoI head
    for k, v in sd.items():
        if fpn_backbone and k.startswith(_Q + "backbone.fpn_"):
            rel = k[len(_Q + "backbone.") :]
            if not _D2_FPN.fullmatch(rel):
                raise ConversionError(f"'{k}' is not a tensor of a detectron2 FPN.")
            out.take("fpn." + rel, v, _Q + "backbone." + rel.split(".")[0] + ".", k)
        elif k.startswith(_Q + "box_head."):
            rel = k[len(_Q + "box_head.") :]
            layer = rel.split(".")[0]
            if re.fullmatch(r"conv\d+|fc1", layer) and _D2_BOX_LAYER.fullmatch(rel):
                out.take("box_head." + rel, v, _Q + "box_head." + layer + ".", k)
    for k in sd:
        if k.startswith(_Q) and k not in out.consumed:
            if k.startswith(_Q + "box_head."):
                out.leave(_Q + "box_head.", "pretext fc layers after fc1", k)
            else:  # one row per query-encoder module: encoder_q.head., encoder_q.embed., ...
                out.leave(".".join(k.split(".")[:2]) + ".", "projection / embedding head", k)
    out.leave_rest(sd, [("encoder_k.", "key (momentum) encoder"), ("queue", "negative-key queue")])
    out.meta_architecture = meta_architecture or _infer_meta_architecture(sd)
    out.format = f"InsLocDetCo {out.meta_architecture} pretraining checkpoint"
    _check_meta_architecture(out, sd)
    return out


def _infer_meta_architecture(sd: Dict) -> str:
    """The meta-architecture whose query-encoder layout matches (no config.yaml says it)."""
    if any(k.startswith(_Q + "backbone.bottom_up.") for k in sd):
        return "InsLocFPN"
    if any(k.startswith(_Q + "res5.") for k in sd):
        return "InsLocC4"
    return "MoCoV2"  # MoCo v2 and DetCo share the ResNet layout; the heads are left out


def _check_meta_architecture(out: Transferable, sd: Dict):
    meta = out.meta_architecture
    if meta not in KNOWN_META_ARCHITECTURES:
        raise ConversionError(
            f"Don't know how to convert meta-architecture '{meta}'; known: "
            f"{', '.join(KNOWN_META_ARCHITECTURES)}."
        )
    layout = KNOWN_META_ARCHITECTURES[meta]
    if layout == "fpn+box_head" and not {"fpn", "box_head"} <= set(out.groups):
        raise ConversionError(
            f"Checkpoint says {meta} but has no FPN and box-head tensors (found {out.groups})."
        )
    if layout == "resnet+res5" and not any(k.startswith(_Q + "res5.") for k in sd):
        raise ConversionError(f"Checkpoint says {meta} but has no '{_Q}res5.*'.")


def normalise_moco(sd: Dict, container: Dict) -> Transferable:
    """MoCo's ``main_moco.py`` checkpoint: a torchvision ResNet as ``encoder_q`` (``fc`` is
    the projection: one layer in v1, an MLP in v2), ``encoder_k`` and ``queue``."""
    out = Transferable()
    _take_torchvision_resnet(out, sd, _Q, "projection head (fc)")
    out.leave_rest(sd, [("encoder_k.", "key (momentum) encoder"), ("queue", "negative-key queue")])
    version = "v2" if _Q + "fc.0.weight" in sd else "v1"
    arch = f", arch '{container['arch']}'" if container.get("arch") else ""
    out.format = f"MoCo {version} checkpoint (facebookresearch/moco main_moco.py{arch})"
    return out


def normalise_openselfsup(sd: Dict) -> Transferable:
    """OpenSelfSup runners (DenseCL, its MoCo): ``encoder_q = Sequential(ResNet, neck)``."""
    out = Transferable()
    _take_torchvision_resnet(out, sd, _Q + "0.", "classifier (fc)")
    out.leave_rest(
        sd,
        [
            (_Q + "1.", "projection neck"),
            ("encoder_k.", "key (momentum) encoder"),
            ("backbone.", "the same ResNet again (encoder_q.0 registered twice)"),
            ("queue", "negative-key queue"),
            ("head.", "contrastive head"),
        ],
    )
    name = "DenseCL" if "queue2" in sd else "OpenSelfSup"
    out.format = f"{name} pretraining checkpoint (ResNet in encoder_q.0)"
    return out


def normalise_instance_loc(sd: Dict) -> Transferable:
    """InstanceLoc's mmdetection checkpoints: query branch ``backbone``, ``neck``, ``roi_head``;
    momentum branch ``backbone_k``, ``neck_k``, ``roi_head_k``."""
    out = Transferable()
    _take_torchvision_resnet(out, sd, "backbone.", "classifier (fc)")
    c4 = any(k.startswith("roi_head.shared_head.layer4.") for k in sd)
    if c4:  # the C4 variant's res5 is its RoI head (mmdetection's "shared head")
        _take_torchvision_resnet(out, sd, "roi_head.shared_head.", "classifier (fc)")
    else:
        _take_mmdet_neck(out, sd)
        _take_mmdet_box_head(out, sd)
    out.leave_rest(
        sd,
        [
            ("backbone_k.", "key (momentum) encoder"),
            ("neck_k.", "key (momentum) encoder"),
            ("roi_head_k.", "key (momentum) encoder"),
            ("queue", "negative-key queue"),
            ("roi_head.bbox_head.shared_fcs.", "pretext fc layers after fc1"),
            ("roi_head.bbox_head.", "projection / embedding head"),
            ("rpn_head.", "box-augmentation anchors"),
        ],
    )
    out.meta_architecture = "InsLocC4" if c4 else "InsLocFPN"
    out.format = f"InstanceLoc (mmdetection) R50-{'C4' if c4 else 'FPN'} pretraining checkpoint"
    if not c4 and "box_head" not in out.groups:
        raise ConversionError(
            "An InstanceLoc FPN checkpoint without 'roi_head.bbox_head.shared_convs'."
        )
    return out


def _take_mmdet_neck(out: Transferable, sd: Dict):
    """mmdetection FPN ``neck.{lateral,fpn}_convs.i`` -> ``fpn_{lateral,output}<level>``. The
    level is read from the lateral conv's input channels (256 -> 2, ..., 2048 -> 5)."""
    levels = {}
    for k, v in sd.items():
        m = re.fullmatch(r"neck\.lateral_convs\.(\d+)\.conv\.weight", k)
        if m:
            if v.shape[1] not in _LEVEL_OF_CHANNELS:
                raise ConversionError(f"'{k}' takes {v.shape[1]} channels: not a ResNet-50 FPN.")
            levels[m.group(1)] = _LEVEL_OF_CHANNELS[v.shape[1]]
    if not levels:
        raise ConversionError("An InstanceLoc FPN checkpoint without 'neck.lateral_convs'.")
    for k, v in sd.items():
        m = re.fullmatch(r"neck\.(lateral|fpn)_convs\.(\d+)\.(.+)", k)
        if not m:
            continue
        kind, index, rel = m.groups()
        if index not in levels:  # extra output convs (P6, P7): no place in a detectron2 FPN
            out.leave(f"neck.{kind}_convs.{index}.", "extra FPN level", k)
            continue
        suffix = _conv_module(rel)
        if suffix is None:
            raise ConversionError(f"'{k}' is not a conv or BN tensor of an mmcv ConvModule.")
        layer = f"fpn_{'lateral' if kind == 'lateral' else 'output'}{levels[index]}"
        out.take(f"fpn.{layer}.{suffix}", v, f"neck.{kind}_convs.{index}.", k)


def _take_mmdet_box_head(out: Transferable, sd: Dict):
    """InstanceLoc's box head: ``shared_convs.i`` (conv + BN + ReLU) -> ``conv<i+1>``,
    ``shared_fcs.0`` -> ``fc1``: the 4conv1fc detector head. Later fcs are the pretext's."""
    head = "roi_head.bbox_head."
    for k, v in sd.items():
        m = re.fullmatch(re.escape(head) + r"shared_convs\.(\d+)\.(.+)", k)
        if m:
            suffix = _conv_module(m.group(2))
            if suffix is None:
                raise ConversionError(f"'{k}' is not a conv or BN tensor of an mmcv ConvModule.")
            index = int(m.group(1))
            out.take(f"box_head.conv{index + 1}.{suffix}", v, f"{head}shared_convs.{index}.", k)
        elif re.fullmatch(re.escape(head) + r"shared_fcs\.0\.(weight|bias)", k):
            out.take("box_head.fc1." + k.rsplit(".", 1)[1], v, head + "shared_fcs.0.", k)


def normalise_torchvision(sd: Dict, prefix: str, container: Dict) -> Transferable:
    """A torchvision-layout ResNet under ``prefix``: torchvision's own weights, the backbones
    DenseCL / DetCo / OpenSelfSup release (in ``state_dict``), an mmdetection ``backbone.``."""
    out = Transferable()
    _take_torchvision_resnet(out, sd, prefix, "ImageNet classifier (fc)")
    out.leave_rest(sd, [])
    author = container.get("author")
    if prefix:
        where = f"under '{prefix}' (mmdetection / OpenSelfSup naming)"
    elif container.get("wrapper") == "state_dict":
        where = "in 'state_dict' (a released DenseCL / DetCo / OpenSelfSup backbone)"
    else:
        where = "state dict (e.g. torchvision's resnet50-*.pth)"
    out.format = f"torchvision-layout ResNet {where}" + (f", author '{author}'" if author else "")
    return out


def normalise_detectron2(sd: Dict, container: Dict) -> Transferable:
    """detectron2 names: a layout-neutral ResNet (``stem``, ``res2``...: MoCo's and DenseCL's
    converters, our ``any`` target), a C4, FPN or RetinaNet detector (``.pkl`` / ``.pth``)."""
    out = Transferable()
    if any(k.startswith("backbone.bottom_up.") for k in sd):
        kind, resnet = "FPN / RetinaNet detector", "backbone.bottom_up."
    elif any(k.startswith(("backbone.", "roi_heads.res5.")) for k in sd):
        kind, resnet = "C4 detector", "backbone."
    else:
        kind, resnet = "layout-neutral ResNet", ""
    _take_detectron2_resnet(out, sd, resnet)
    if resnet == "backbone.":
        _take_detectron2_resnet(out, sd, "roi_heads.", stages=("res5",))
    for k, v in sd.items():
        if k.startswith("backbone.fpn_") and resnet == "backbone.bottom_up.":
            rel = k[len("backbone.") :]
            if _D2_FPN.fullmatch(rel):
                out.take("fpn." + rel, v, "backbone." + rel.split(".")[0] + ".", k)
        elif k.startswith("roi_heads.box_head."):
            rel = k[len("roi_heads.box_head.") :]
            if _D2_BOX_LAYER.fullmatch(rel):
                out.take("box_head." + rel, v, "roi_heads.box_head." + rel.split(".")[0] + ".", k)
    out.leave_rest(
        sd,
        [
            ("backbone.top_block.", "RetinaNet's P6/P7 convs"),
            ("roi_heads.res5.norm.", "extra norm of the fine-tuning recipe"),
            ("roi_heads.box_head.", "box-head layer of the fine-tuning recipe"),
            ("roi_heads.box_predictor.", "task-specific head"),
            ("roi_heads.mask_head.", "task-specific head"),
            ("roi_heads.keypoint_head.", "task-specific head"),
            ("proposal_generator.", "task-specific head (RPN)"),
            ("head.", "task-specific head (RetinaNet)"),
            ("pixel_", "input normalisation"),
        ],
    )
    author = container.get("author")
    out.format = f"detectron2 {kind}" + (f" (model-zoo file, author '{author}')" if author else "")
    return out
