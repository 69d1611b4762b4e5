#!/usr/bin/env python
"""
InsLoc's cost relative to MoCo v2 at the same batch, resolution, queue size and device.

    python bench/bench_insloc.py                                    # instant scale, CPU
    python bench/bench_insloc.py --device cuda --fpn-config pretrain_insloc_fpn.yaml \
        --c4-config pretrain_insloc_c4.yaml SOLVER.IMS_PER_BATCH 32 \
        DATASETS.TRAIN "('pretrain_demo',)"                          # one GPU, paper sizes

Reports
  * the training-step time of InsLoc-FPN and InsLoc-C4 as a ratio to MoCo v2 on views of the
    canvas size (same batch, queue, BN splits, data), all from ``bench_pretrain.measure_step``;
  * the compositor's throughput ("dataset" backgrounds: 3 decodes per sample; "batch"
    backgrounds: 1 decode, pasted in ``collate``) as a ratio to the plain MoCo v2 mapper,
    single process, decoding included.
Ratios travel across machines, img/s do not. On the CPU the timer is process CPU time on one
torch thread (wall time on a shared CPU swings several-fold); measurements are interleaved and
the best of ``--repeats`` kept.

Measured ratios: ``docs/SPEED.md``.
"""

import argparse
import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_pretrain import add_timing_arguments, load_cfg, measure_step, select_clock  # noqa: E402

from insloc_detco.data import build_pretrain_mapper, get_pretrain_dataset_dicts  # noqa: E402


def moco_v2_like(cfg):
    """MoCo v2 (R50, res5 MLP 2048 -> 128) on views of the InsLoc ``cfg``'s canvas size."""
    moco = cfg.clone()
    moco.MODEL.META_ARCHITECTURE = "MoCoV2"
    moco.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    moco.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    moco.MODEL.CONTRAST.MLP_HIDDEN_DIM = 2048
    moco.INPUT.PRETRAIN.MAPPER = "MoCoV2Mapper"
    moco.INPUT.PRETRAIN.CROP_SIZE = cfg.INPUT.PRETRAIN.COPY_PASTE.CANVAS_SIZE
    return moco


def with_background(cfg, source: str):
    out = cfg.clone()
    out.INPUT.PRETRAIN.COPY_PASTE.BACKGROUND = source
    return out


def measure_mapper(cfg, images: int = 48, clock=time.perf_counter) -> float:
    """Mapper (and ``collate``, per batch of ``IMS_PER_BATCH``) in this process, on one torch
    thread as in a loader worker: img per ``clock`` second."""
    dicts = get_pretrain_dataset_dicts(cfg.DATASETS.TRAIN)
    mapper = build_pretrain_mapper(cfg, dicts)
    collate = getattr(mapper, "collate", lambda batch: batch)
    batch_size, records = cfg.SOLVER.IMS_PER_BATCH, itertools.cycle(dicts)

    def one_batch():
        batch = [x for x in (mapper(next(records)) for _ in range(batch_size)) if x is not None]
        return len(collate(batch))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # DataLoader workers run single-threaded
    try:
        one_batch()  # first-call costs (lazy imports, allocator) are not throughput
        done, start = 0, clock()
        while done < images:
            done += one_batch()
        return done / (clock() - start)
    finally:
        torch.set_num_threads(threads)


def best_of(repeats: int, runs, measure):
    """{name: best rate} over ``repeats`` round-robin passes of ``measure(cfg)``."""
    best = {name: 0.0 for name, _ in runs}
    for _ in range(repeats):
        for name, cfg in runs:
            torch.manual_seed(0)
            best[name] = max(best[name], measure(cfg))
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fpn-config", default="instant_test/pretrain_insloc_fpn.yaml")
    parser.add_argument("--c4-config", default="instant_test/pretrain_insloc_c4.yaml")
    add_timing_arguments(parser, iters=3, repeats=2)
    parser.add_argument("--images", type=int, default=48, help="images per mapper timing")
    parser.add_argument("--no-step", action="store_true", help="skip the training steps")
    parser.add_argument("--no-mapper", action="store_true", help="skip the compositor")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    opts = ["MODEL.DEVICE", args.device, *args.opts]
    fpn, c4 = load_cfg(args.fpn_config, opts), load_cfg(args.c4_config, opts)
    moco = moco_v2_like(fpn)
    canvas = fpn.INPUT.PRETRAIN.COPY_PASTE.CANVAS_SIZE
    print(
        f"batch {fpn.SOLVER.IMS_PER_BATCH}, {canvas} px canvases / MoCo v2 crops, queue "
        f"{fpn.MODEL.CONTRAST.QUEUE_SIZE}, data {', '.join(fpn.DATASETS.TRAIN)}, device "
        f"{args.device}"
    )
    clock_name, clock = select_clock(args.clock, args.device)
    unit = "img/s" if clock_name == "wall" else "img/CPU-s"
    print(f"timer: {clock_name} time, torch threads {torch.get_num_threads()}")
    if not args.no_step:
        runs = [("MoCo v2 (same scale)", moco), ("InsLoc-FPN", fpn), ("InsLoc-C4", c4)]
        rates = best_of(args.repeats, runs, lambda cfg: measure_step(cfg, args.iters, clock=clock))
        base = rates[runs[0][0]]
        for name, rate in rates.items():
            print(f"{name:22s} step {rate:8.2f} {unit}   time ratio to MoCo v2 {base / rate:.3f}")
    if not args.no_mapper:
        runs = [
            ("MoCo v2 mapper", moco),
            ("copy-paste, dataset bg", with_background(fpn, "dataset")),
            ("copy-paste, batch bg", with_background(fpn, "batch")),
        ]
        rates = best_of(
            args.repeats, runs, lambda cfg: measure_mapper(cfg, args.images, clock=clock)
        )
        base = rates[runs[0][0]]
        for name, rate in rates.items():
            print(f"{name:22s} {rate:8.2f} {unit}   throughput ratio to MoCo v2 {rate / base:.3f}")


if __name__ == "__main__":
    main()
