"""
The frozen network every readout measures: detectron2's own ResNet-50 (and FPN, box head) in a
downstream detector's layout, loaded through the transfer converter.

Two layouts, named like the converter's targets, so that a converted checkpoint loads by name:

* ``c4``: ``backbone.*`` (stem, res2..res4, :func:`build_resnet_backbone`) and
  ``roi_heads.res5.*`` (built by ``Res5ROIHeads``). Whole-image features run res5 on the res4
  map; box features are RoIAlign 14x14 on res4 -> res5 -> average pool (2048-d), the C4
  detector's per-box computation.
* ``fpn``: ``backbone.*`` (:func:`build_resnet_fpn_backbone`: ``bottom_up`` res2..res5 and the
  FPN) and ``roi_heads.box_head.*`` (``FastRCNNConvFCHead`` 4conv1fc). Box features are the FPN
  detector's: multi-level RoIAlign 7x7 on P2..P5 -> box head -> fc1 (1024-d).

Every method's checkpoint converts completely to ``c4`` (InsLoc-FPN's res5 becomes the C4 head),
so image-level readouts and the default localization readout compare all methods on one
architecture; ``fpn`` adds InsLoc-FPN's pretrained FPN and box head (random for the others).
"""

import logging
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable, get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import FastRCNNConvFCHead, Res5ROIHeads
from detectron2.structures import Boxes
from fvcore.nn.precise_bn import update_bn_stats
from torch import nn

from ..engine.runs import RANDOM_INIT
from ..transfer.converter import ConversionError, convert_checkpoint, load_model_zoo_pkl
from ..transfer.fitting import match_model_zoo_file, match_weights

__all__ = [
    "LAYOUTS",
    "STAGES",
    "RANDOM_INIT",
    "ReadoutError",
    "WeightsReport",
    "readout_config",
    "ReadoutEncoder",
    "load_encoder_weights",
    "build_readout_encoder",
]

logger = logging.getLogger(__name__)

LAYOUTS = ("c4", "fpn")
STAGES = ("res2", "res3", "res4", "res5")


class ReadoutError(RuntimeError):
    """A problem with the inputs of a readout (weights, data, settings)."""


def readout_config(layout: str, opts: Sequence[str] = ()) -> CfgNode:
    """
    The detectron2 config of the readout network: R50 with the pretraining/transfer input
    convention (RGB, torchvision statistics, stride in the 3x3 conv) and BN (frozen: eval mode).

    Args:
        layout: "c4" or "fpn".
        opts: ``KEY VALUE`` overrides (e.g. ``MODEL.RESNETS.DEPTH 101``).
    """
    if layout not in LAYOUTS:
        raise ReadoutError(f"Unknown layout '{layout}'; choose one of {LAYOUTS}.")
    cfg = get_cfg()
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
    cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
    cfg.INPUT.FORMAT = "RGB"
    r = cfg.MODEL.RESNETS
    r.DEPTH, r.STRIDE_IN_1X1, r.NORM = 50, False, "BN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0  # frozen by eval() + no grad, not by FrozenBN
    h = cfg.MODEL.ROI_BOX_HEAD
    h.POOLER_TYPE, h.POOLER_SAMPLING_RATIO = "ROIAlignV2", 0
    if layout == "c4":
        cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
        r.OUT_FEATURES = ["res2", "res3", "res4"]  # res5 is the RoI head
        h.POOLER_RESOLUTION = 14
    else:
        cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
        r.OUT_FEATURES = list(STAGES)
        cfg.MODEL.FPN.IN_FEATURES = list(STAGES)
        cfg.MODEL.FPN.NORM = "BN"
        h.NAME, h.NUM_CONV, h.CONV_DIM, h.NUM_FC, h.FC_DIM, h.NORM = (
            "FastRCNNConvFCHead",
            4,
            256,
            1,
            1024,
            "BN",
        )
        h.POOLER_RESOLUTION = 7
    cfg.merge_from_list(list(opts))
    return cfg


class ReadoutEncoder(nn.Module):
    """
    A frozen backbone (+ the detector's per-box head) with state-dict names of a detectron2
    detector of the same layout. Inputs are uint8 RGB images; outputs are pooled features.
    """

    @configurable
    def __init__(
        self,
        *,
        layout: str,
        backbone: nn.Module,
        roi_heads: nn.ModuleDict,
        box_pooler: ROIPooler,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
    ):
        """
        Args:
            layout: "c4" (``roi_heads`` holds ``res5``) or "fpn" (``roi_heads`` holds
                ``box_head``; ``backbone`` is an FPN).
            box_pooler: RoIAlign of boxes on res4 (c4) or on P2..P5 (fpn).
            pixel_mean, pixel_std: normalisation of the 0-255 RGB input.
        """
        super().__init__()
        self.layout = layout
        self.backbone = backbone
        self.roi_heads = roi_heads
        self.box_pooler = box_pooler
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.eval()
        self.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg):
        layout = "fpn" if "fpn" in cfg.MODEL.BACKBONE.NAME else "c4"
        backbone = build_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
        shapes = backbone.output_shape()
        h = cfg.MODEL.ROI_BOX_HEAD
        if layout == "c4":
            res5, _ = Res5ROIHeads._build_res5_block(cfg)
            roi_heads = nn.ModuleDict({"res5": res5})
            levels = ["res4"]
        else:
            r = h.POOLER_RESOLUTION
            levels = ["p2", "p3", "p4", "p5"]
            box_head = FastRCNNConvFCHead(
                cfg, ShapeSpec(channels=shapes["p2"].channels, height=r, width=r)
            )
            roi_heads = nn.ModuleDict({"box_head": box_head})
        pooler = ROIPooler(
            output_size=h.POOLER_RESOLUTION,
            scales=tuple(1.0 / shapes[f].stride for f in levels),
            sampling_ratio=h.POOLER_SAMPLING_RATIO,
            pooler_type=h.POOLER_TYPE,
        )
        return {
            "layout": layout,
            "backbone": backbone,
            "roi_heads": roi_heads,
            "box_pooler": pooler,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def train(self, mode: bool = True):
        """Always in eval mode: BN uses the pretrained statistics (the readouts' protocol)."""
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 RGB -> normalised float on the encoder's device."""
        x = images.to(self.device, non_blocking=True).float()
        return (x - self.pixel_mean) / self.pixel_std

    def feature_maps(self, x: torch.Tensor, stages: Sequence[str] = STAGES) -> Dict:
        """
        Args:
            x: (N, 3, H, W) normalised images.
        Returns:
            {stage: (N, C, H / stride, W / stride)} for ``stages`` (and what they need), plus
            the FPN levels ``p2``..``p5`` in the fpn layout.
        """
        if self.layout == "fpn":
            # Only run the FPN when its levels are needed (box features); the ResNet outputs
            # are taken on the way, so that every layer runs once.
            if not any(s.startswith("p") for s in stages):
                return self.backbone.bottom_up(x)
            resnet = {}
            hook = self.backbone.bottom_up.register_forward_hook(lambda m, i, o: resnet.update(o))
            try:
                out = self.backbone(x)
            finally:
                hook.remove()
            return {**resnet, **out}
        out = self.backbone(x)
        if "res5" in stages:
            out["res5"] = self.roi_heads["res5"](out["res4"])
        return out

    def box_features(self, maps: Dict[str, torch.Tensor], boxes: List[torch.Tensor]):
        """
        Args:
            maps: output of :meth:`feature_maps` (res4 for c4, p2..p5 for fpn).
            boxes: per image, (M_i, 4) XYXY boxes in input pixels.
        Returns:
            (sum M_i, D) per-box features: D = 2048 (c4: res5 + average pool) or 1024 (fpn: fc1).
        """
        boxes = [Boxes(b.to(self.device).float()) for b in boxes]
        if self.layout == "c4":
            pooled = self.box_pooler([maps["res4"]], boxes)
            return self.roi_heads["res5"](pooled).mean(dim=(2, 3))
        pooled = self.box_pooler([maps[f] for f in ("p2", "p3", "p4", "p5")], boxes)
        return self.roi_heads["box_head"](pooled)

    @torch.no_grad()
    def forward(
        self,
        images: torch.Tensor,
        stages: Sequence[str] = ("res5",),
        boxes: Optional[List[torch.Tensor]] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            images: (N, 3, H, W) uint8 RGB.
            stages: stages whose globally average-pooled features are returned.
            boxes: per image, (M_i, 4) XYXY boxes; their features are returned as "boxes".
        Returns:
            {stage: (N, C_stage)} and, with ``boxes``, {"boxes": (sum M_i, D)}; float32 on the
            encoder's device.
        """
        needed = list(stages)
        if boxes is not None:
            needed += ["res4"] if self.layout == "c4" else ["p2"]
        maps = self.feature_maps(self.preprocess(images), needed)
        out = {s: F.adaptive_avg_pool2d(maps[s], 1).flatten(1) for s in stages}
        if boxes is not None:
            out["boxes"] = self.box_features(maps, boxes)
        return out

    @torch.no_grad()
    def recompute_bn_statistics(self, batches: Iterable[torch.Tensor], boxes=None):
        """
        Re-estimate the running mean / variance of every BatchNorm layer on ``batches``, the
        weights fixed (fvcore's ``update_bn_stats``, detectron2's PreciseBN), so that the
        statistics describe the readout's images rather than the pretraining views.

        Args:
            batches: (N, 3, H, W) uint8 image batches.
            boxes: (M, 4) boxes per image, for the fpn layout's box head.
        """
        bns = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        batches = list(batches)
        for m in bns:
            m.training = True
        try:
            # c4: res5 runs on the whole res4 map (a layer may run once per batch here).
            per_image = None if self.layout == "c4" or boxes is None else boxes
            forward = _BNForward(self, per_image)
            update_bn_stats(forward, iter(batches), num_iters=len(batches))
        finally:
            for m in bns:
                m.training = False


class _BNForward(nn.Module):
    """Adapter for ``update_bn_stats``: one batch of images -> every BN layer once."""

    def __init__(self, encoder: "ReadoutEncoder", boxes: Optional[torch.Tensor]):
        super().__init__()
        self.encoder = encoder
        self.boxes = boxes

    def forward(self, images: torch.Tensor):
        boxes = None if self.boxes is None else [self.boxes] * len(images)
        return self.encoder(images, stages=("res5",), boxes=boxes)


# ------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------
@dataclass
class WeightsReport:
    """
    What a weights file put into a :class:`ReadoutEncoder`.

    Attributes:
        weights: the file (or "random").
        loaded: number of tensors loaded; total: tensors of the encoder.
        random_init: top-level groups left at their random initialisation (e.g. the FPN and box
            head when an image-level method's checkpoint is read into the fpn layout).
        meta_architecture: the pretraining method, when the file says.
    """

    weights: str
    loaded: int = 0
    total: int = 0
    random_init: List[str] = field(default_factory=list)
    meta_architecture: str = ""

    def summary(self) -> str:
        if self.weights == RANDOM_INIT:
            return "random initialisation (no pretrained tensor)"
        s = f"{self.loaded} of {self.total} tensors from {self.weights}"
        if self.random_init:
            s += f" ({', '.join(self.random_init)} left at random init)"
        return s


def _match(weights: str, encoder: ReadoutEncoder):
    """The weights file matched to ``encoder`` (:func:`match_weights`: detectron2 names, right
    shapes, the whole ResNet; tensors the readout network lacks, e.g. a detector's RPN, are
    left out). Returns (:class:`WeightsMatch`, meta_architecture)."""
    model_state, layout = encoder.state_dict(), encoder.layout
    model = f"the '{layout}' readout network"
    if not weights.endswith(".pkl"):
        conversion, _ = convert_checkpoint(weights, layout)
        match = match_weights(model_state, conversion.model, weights, model, allow_unused=True)
        return match, conversion.meta_architecture
    data = load_model_zoo_pkl(weights)
    target = data.get("target")
    if target and target != layout and not (target == "retinanet" and layout == "fpn"):
        raise ReadoutError(
            f"'{weights}' was converted for a '{target}' detector; this readout builds the "
            f"'{layout}' layout. Pass --layout {target if target in LAYOUTS else 'fpn'}, or "
            "the pretraining checkpoint (.pth), which is converted for any layout."
        )
    match = match_model_zoo_file(model_state, data, weights, model, allow_unused=True)
    return match, data.get("meta_architecture", "")


def load_encoder_weights(encoder: ReadoutEncoder, weights: str) -> WeightsReport:
    """
    Load a pretraining checkpoint (``.pth``: converted for the encoder's layout by
    :func:`convert_checkpoint`) or a model-zoo ``.pkl`` (any detectron2 ResNet-50, matched by
    name with detectron2's heuristics) into ``encoder``; ``"random"`` loads nothing.

    Raises:
        ReadoutError: a ResNet tensor is missing or has the wrong shape (every readout needs
            the whole pretrained ResNet), or the file is not a checkpoint we can read.
    """
    report = WeightsReport(weights=weights, total=len(encoder.state_dict()))
    if weights == RANDOM_INIT:
        report.random_init = ["all"]
        return report
    try:
        match, report.meta_architecture = _match(weights, encoder)
    except ConversionError as e:
        raise ReadoutError(str(e)) from None
    encoder.load_state_dict(match.loaded, strict=False)
    report.loaded = len(match.loaded)
    report.random_init = sorted({".".join(k.split(".")[:2]) for k in match.missing})
    if report.random_init:
        logger.warning(f"Not in '{weights}', left at random init: {report.random_init}")
    return report


def build_readout_encoder(
    weights: str,
    layout: str = "c4",
    device: str = "cpu",
    seed: int = 0,
    opts: Sequence[str] = (),
):
    """
    Returns:
        (ReadoutEncoder on ``device``, frozen, in eval mode; its :class:`WeightsReport`).
        ``seed`` fixes the random initialisation of whatever the weights do not cover.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = ReadoutEncoder(readout_config(layout, opts))
    report = load_encoder_weights(encoder, weights)
    return encoder.to(device), report
