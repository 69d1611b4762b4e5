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

__all__ = ["Benchmark", "BENCHMARKS", "get_benchmark", "benchmark_table"]


@dataclass(frozen=True)
class Benchmark:
    """
    Attributes:
        name: what ``eval_transfer.py run --benchmark`` takes.
        config: transfer config, relative to ``configs/transfer/`` (or a path).
        trials: default number of fine-tunes with different seeds (mean +- std reported).
        description: one line for ``--list``.
    """

    name: str
    config: str
    trials: int
    description: str


# VOC varies by about +-0.3 AP between runs: MoCo and InsLoc average 5 trials. Small COCO
# subsets vary too (choice: 3); full COCO runs are long and stable (1).
_ALL = [
    Benchmark("voc_c4_24k", "voc_faster_rcnn_R_50_C4_24k.yaml", 5,
              "VOC07+12 -> VOC07 test, Faster R-CNN R50-C4, 24k iters"),
    Benchmark("coco_c4_1x", "coco_mask_rcnn_R_50_C4_1x.yaml", 1,
              "COCO train2017 -> val2017, Mask R-CNN R50-C4, 1x (90k)"),
    Benchmark("coco_c4_2x", "coco_mask_rcnn_R_50_C4_2x.yaml", 1,
              "COCO train2017 -> val2017, Mask R-CNN R50-C4, 2x (180k)"),
    Benchmark("coco_fpn_1x", "coco_mask_rcnn_R_50_FPN_1x.yaml", 1,
              "COCO train2017 -> val2017, Mask R-CNN R50-FPN, 1x (90k)"),
    Benchmark("coco_fpn_2x", "coco_mask_rcnn_R_50_FPN_2x.yaml", 1,
              "COCO train2017 -> val2017, Mask R-CNN R50-FPN, 2x (180k)"),
    Benchmark("coco_c4_12k", "coco_mask_rcnn_R_50_C4_12k.yaml", 1,
              "COCO short schedule, Mask R-CNN R50-C4, 12k iters (DetCo)"),
    Benchmark("coco_fpn_12k", "coco_mask_rcnn_R_50_FPN_12k.yaml", 1,
              "COCO short schedule, Mask R-CNN R50-FPN, 12k iters (DetCo)"),
    Benchmark("mini_coco_c4_12ep", "mini_coco_mask_rcnn_R_50_C4_12ep.yaml", 3,
              "Mini-COCO (10% train2017) -> val2017, Mask R-CNN R50-C4, 12 epochs (InsLoc)"),
    *[
        Benchmark(f"semi_coco_{p}pct_retinanet_12k", f"coco_retinanet_R_50_FPN_12k_{p}pct.yaml", 3,
                  f"COCO {p}% train2017 -> val2017, RetinaNet R50-FPN, 12k iters (DetCo)")
        for p in (1, 2, 5, 10)
    ],
    # Instant tests on the generated demo_det set: minutes on a CPU.
    Benchmark("demo_voc_c4", "instant_test/voc_faster_rcnn_R_50_C4.yaml", 2,
              "instant test: demo_det (VOC format), Faster R-CNN R50-C4, 20 iters"),
    Benchmark("demo_coco_c4", "instant_test/coco_mask_rcnn_R_50_C4.yaml", 1,
              "instant test: demo_det (COCO format), Mask R-CNN R50-C4, 20 iters"),
    Benchmark("demo_coco_fpn", "instant_test/coco_mask_rcnn_R_50_FPN.yaml", 1,
              "instant test: demo_det (COCO format), Mask R-CNN R50-FPN, 20 iters"),
    Benchmark("demo_semi_retinanet", "instant_test/coco_retinanet_R_50_FPN_semi.yaml", 1,
              "instant test: 50% of demo_det (COCO format), RetinaNet R50-FPN, 20 iters"),
]  # fmt: skip
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
    """The ``--list`` table: name, detector layout, trials, data sets, config."""
    rows = [("benchmark", "layout", "trials", "train -> test", "config")]
    for b in BENCHMARKS.values():
        cfg = load_transfer_config(b.config)
        data = f"{'+'.join(cfg.DATASETS.TRAIN)} -> {'+'.join(cfg.DATASETS.TEST)}"
        rows.append((b.name, target_of_config(cfg), str(b.trials), data, b.config))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n\n" + "\n".join(f"{b.name}: {b.description}" for b in _ALL)
