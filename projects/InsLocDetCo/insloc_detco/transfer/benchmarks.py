"""
The transfer benchmarks: name -> recipe (a config under ``configs/transfer/``), data sets,
evaluator, default number of trials. The detector layout the weights are converted for, the
data sets and the evaluator all follow from the config (single source of truth):
``target_of_config`` and the data sets' ``evaluator_type``.
"""

import os
from collections import OrderedDict
from dataclasses import dataclass

from .config import load_transfer_config, resolve_transfer_config
from .converter import target_of_config

__all__ = ["Benchmark", "BENCHMARKS", "PROTOCOLS", "get_benchmark", "benchmark_table"]


# Whose fine-tuning protocol a benchmark follows (its recipe's comments give the details):
PROTOCOLS = {
    "MoCo": "MoCo (He et al. 2020): C4, naiveSyncBN, extra norm after res5",
    "InsLoc": "InsLoc (Yang et al. 2021): MoCo's + FPN with 4conv1fc box head, BN in the heads; "
    "BN after fc1 too for weights with InsLoc's pretrained box head (box_head_choice.py)",
    "DetCo": "DetCo (Xie et al. 2021, released configs): SyncBN in backbone and FPN only, "
    "standard 2fc heads, C4 MAX_SIZE_TRAIN 1200, 12k steps 9000/11000",
}


@dataclass(frozen=True)
class Benchmark:
    """
    Attributes:
        name: what ``eval_transfer.py run --benchmark`` takes.
        config: transfer config, relative to ``configs/transfer/`` (or a path).
        trials: default number of fine-tunes with different seeds (mean +- std reported).
        description: one line for ``--list``.
        protocol: whose fine-tuning protocol the recipe follows (a key of ``PROTOCOLS``;
            "" for a custom config). Compare methods within one protocol only: InsLoc's FPN
            protocol gives MoCo v2 39.8 AP (COCO 1x), DetCo's about 38.3.
    """

    name: str
    config: str
    trials: int
    description: str
    protocol: str = ""


# Where DetCo reports each schedule (Xie et al. 2021; 2x in its appendix).
_MASK_RCNN_TABLES = {"12k": "Table 2", "1x": "Table 3", "2x": "appendix"}
_RETINANET_TABLES = {"12k": "Table 7", "1x": "Table 7", "2x": "Table 7"}

# VOC varies by about +-0.3 AP between runs: MoCo and InsLoc average 5 trials. Small COCO
# subsets vary too (choice: 3); full COCO runs are long and stable (1).
_ALL = [
    Benchmark(
        "voc_c4_24k",
        "voc_faster_rcnn_R_50_C4_24k.yaml",
        5,
        "VOC07+12 -> VOC07 test, Faster R-CNN R50-C4, 24k iters (DetCo's VOC recipe too)",
        "MoCo",
    ),
    Benchmark(
        "coco_c4_1x",
        "coco_mask_rcnn_R_50_C4_1x.yaml",
        1,
        "COCO train2017 -> val2017, Mask R-CNN R50-C4, 1x (90k)",
        "MoCo",
    ),
    Benchmark(
        "coco_c4_2x",
        "coco_mask_rcnn_R_50_C4_2x.yaml",
        1,
        "COCO train2017 -> val2017, Mask R-CNN R50-C4, 2x (180k)",
        "MoCo",
    ),
    Benchmark(
        "coco_fpn_1x",
        "coco_mask_rcnn_R_50_FPN_1x.yaml",
        1,
        "COCO train2017 -> val2017, Mask R-CNN R50-FPN 4conv1fc, 1x (90k)",
        "InsLoc",
    ),
    Benchmark(
        "coco_fpn_2x",
        "coco_mask_rcnn_R_50_FPN_2x.yaml",
        1,
        "COCO train2017 -> val2017, Mask R-CNN R50-FPN 4conv1fc, 2x (180k)",
        "InsLoc",
    ),
    Benchmark(
        "coco_c4_12k",
        "coco_mask_rcnn_R_50_C4_12k.yaml",
        1,
        "COCO, Mask R-CNN R50-C4, DetCo's 12k schedule in MoCo's protocol",
        "MoCo",
    ),
    Benchmark(
        "coco_fpn_12k",
        "coco_mask_rcnn_R_50_FPN_12k.yaml",
        1,
        "COCO, Mask R-CNN R50-FPN 4conv1fc, DetCo's 12k schedule in InsLoc's protocol",
        "InsLoc",
    ),
    Benchmark(
        "mini_coco_c4_12ep",
        "mini_coco_mask_rcnn_R_50_C4_12ep.yaml",
        3,
        "Mini-COCO (10% train2017) -> val2017, Mask R-CNN R50-C4, 12 epochs (InsLoc)",
        "InsLoc",
    ),
    *[
        Benchmark(
            f"detco_coco_{det}_{s}",
            f"detco/coco_{recipe}_{s}.yaml",
            1,
            f"COCO train2017 -> val2017, {what}, {s} (DetCo {tables[s]})",
            "DetCo",
        )
        for det, recipe, what, tables in (
            ("fpn", "mask_rcnn_R_50_FPN", "Mask R-CNN R50-FPN 2fc", _MASK_RCNN_TABLES),
            ("c4", "mask_rcnn_R_50_C4", "Mask R-CNN R50-C4", _MASK_RCNN_TABLES),
            ("retinanet", "retinanet_R_50_FPN", "RetinaNet R50-FPN", _RETINANET_TABLES),
        )
        for s in ("12k", "1x", "2x")
    ],
    *[
        Benchmark(
            f"semi_coco_{p}pct_retinanet_12k",
            f"coco_retinanet_R_50_FPN_12k_{p}pct.yaml",
            3,
            f"COCO {p}% train2017 -> val2017, RetinaNet R50-FPN, 12k iters (DetCo Table 8)",
            "DetCo",
        )
        for p in (1, 2, 5, 10)
    ],
    *[
        Benchmark(
            f"semi_coco_{p}pct_mask_rcnn_{det.lower()}_12k",
            f"detco/coco_mask_rcnn_R_50_{det}_12k_{p}pct.yaml",
            3,
            f"COCO {p}% train2017 -> val2017, Mask R-CNN R50-{det}, 12k iters (DetCo appendix)",
            "DetCo",
        )
        for det in ("FPN", "C4")
        for p in (1, 2, 5, 10)
    ],
    Benchmark(
        "detco_coco_keypoint_fpn_2x",
        "detco/keypoint_rcnn_R_50_FPN_2x.yaml",
        1,
        "COCO person keypoints train2017 -> val2017, Keypoint R-CNN R50-FPN, 2x, keypoint "
        "AP (DetCo Table 7)",
        "DetCo",
    ),
    # Cityscapes is small (2,975 training images): several trials, as the COCO subsets.
    Benchmark(
        "detco_cityscapes_fpn",
        "detco/cityscapes_mask_rcnn_R_50_FPN.yaml",
        3,
        "Cityscapes fine train -> val, Mask R-CNN R50-FPN, 24k iters, batch 8, mask AP "
        "(DetCo Table 6)",
        "DetCo",
    ),
    # Instant tests on the generated demo_det set: minutes on a CPU.
    Benchmark(
        "demo_voc_c4",
        "instant_test/voc_faster_rcnn_R_50_C4.yaml",
        2,
        "instant test: demo_det (VOC format), Faster R-CNN R50-C4, 20 iters",
        "MoCo",
    ),
    Benchmark(
        "demo_coco_c4",
        "instant_test/coco_mask_rcnn_R_50_C4.yaml",
        1,
        "instant test: demo_det (COCO format), Mask R-CNN R50-C4, 20 iters",
        "MoCo",
    ),
    Benchmark(
        "demo_coco_fpn",
        "instant_test/coco_mask_rcnn_R_50_FPN.yaml",
        1,
        "instant test: demo_det (COCO format), Mask R-CNN R50-FPN, 20 iters",
        "InsLoc",
    ),
    Benchmark(
        "demo_detco_coco_fpn",
        "instant_test/detco_coco_mask_rcnn_R_50_FPN.yaml",
        1,
        "instant test: demo_det (COCO format), Mask R-CNN R50-FPN 2fc, 20 iters",
        "DetCo",
    ),
    Benchmark(
        "demo_semi_retinanet",
        "instant_test/coco_retinanet_R_50_FPN_semi.yaml",
        1,
        "instant test: 50% of demo_det (COCO format), RetinaNet R50-FPN, 20 iters",
        "DetCo",
    ),
    Benchmark(
        "demo_semi_mask_rcnn_fpn",
        "instant_test/detco_coco_mask_rcnn_R_50_FPN_semi.yaml",
        1,
        "instant test: 50% of demo_det (COCO format), Mask R-CNN R50-FPN 2fc, 20 iters",
        "DetCo",
    ),
    Benchmark(
        "demo_detco_keypoint_fpn",
        "instant_test/detco_keypoint_rcnn_R_50_FPN.yaml",
        1,
        "instant test: demo_det keypoints (shape corners), Keypoint R-CNN R50-FPN, 20 iters",
        "DetCo",
    ),
    Benchmark(
        "demo_detco_cityscapes_fpn",
        "instant_test/detco_cityscapes_mask_rcnn_R_50_FPN.yaml",
        1,
        "instant test: demo_cityscapes (Cityscapes layout), Mask R-CNN R50-FPN, 20 iters",
        "DetCo",
    ),
]
BENCHMARKS = OrderedDict((b.name, b) for b in _ALL)


def get_benchmark(name: str) -> Benchmark:
    """A registered benchmark, or a custom one from a transfer config path (1 trial)."""
    if name in BENCHMARKS:
        return BENCHMARKS[name]
    try:
        path = resolve_transfer_config(name)
    except FileNotFoundError:
        raise KeyError(
            f"Unknown benchmark '{name}'. Known: {', '.join(BENCHMARKS)} "
            "(eval_transfer.py --list), or a transfer config file."
        ) from None
    stem = os.path.splitext(os.path.basename(path))[0]
    return Benchmark(stem, path, 1, f"custom config {path}")


def benchmark_table() -> str:
    """The ``--list`` table: name, protocol, detector layout, trials, data sets, config."""
    rows = [("benchmark", "protocol", "layout", "trials", "train -> test", "config")]
    for b in BENCHMARKS.values():
        cfg = load_transfer_config(b.config)
        data = f"{'+'.join(cfg.DATASETS.TRAIN)} -> {'+'.join(cfg.DATASETS.TEST)}"
        rows.append((b.name, b.protocol, target_of_config(cfg), str(b.trials), data, b.config))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    descriptions = [f"{b.name}: {b.description}" for b in _ALL]
    protocols = [f"{name}: {text}" for name, text in PROTOCOLS.items()]
    return "\n".join(
        lines + [""] + descriptions + ["", "Protocols (compare methods within one):"] + protocols
    )
