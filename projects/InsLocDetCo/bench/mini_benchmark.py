#!/usr/bin/env python
"""
Mini benchmark: does each pretext task learn something a detector can use, at a budget a CPU
can afford? Random init, MoCo v2, InsLoc-C4, InsLoc-FPN and DetCo are pretrained with one
budget (iterations x batch, the same unlabeled images, the same optimiser), several seeds each
(detectron2 ``SEED``: seeded pretraining), then read out with frozen features on the generated
labelled set ``demo_cls`` (one shape on a real photo; 2,000 train / 500 val):

* Views: augmented-view retrieval on the 500 val images at the pretraining's view side (the
  pretext task itself, on unseen images; res5, chance 0.2 %), see
  ``insloc_detco/readout/views.py``;
* kNN: weighted kNN (k 20, T 0.07) of the shape class on pooled res5;
* Cls: linear classification of the shape class on pooled res5;
* Loc: InsLoc's linear localization readout (cell index of a 3 x 3 grid from the cell's RoI
  feature through the R50-C4 head);
* ObjLoc: which of the 9 cells holds the object, from the same per-cell features;

and, with ``--finetune-iters N``, Mask R-CNN fine-tuning on ``demo_det`` as
``eval_transfer.py``. Every method is read out through the same R50-C4 network (each converts
to it completely). Results: mean +- std over the seeds.

    python bench/mini_benchmark.py                     # CPU defaults (docs/BENCHMARKS.md)
    python bench/mini_benchmark.py --device cuda --jobs 1 --pretrain-iters 2000 \\
        --pretrain-batch 128 --image-size 96 --seeds 5   # the same experiment, larger

Everything goes under ``--output-dir``; re-running skips finished pretraining runs and
readouts. ``--jobs`` runs that many single-threaded runs side by side (CPU), from one queue:
the longest pretraining runs first, each readout as soon as its checkpoint exists.

Measured times, the table and what it shows: ``docs/BENCHMARKS.md``.
"""

import dataclasses
import json
import math
import os
import sys
import time
from argparse import ArgumentParser
from concurrent.futures import ProcessPoolExecutor, as_completed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mini_runs  # noqa: E402
from mini_runs import METHODS, StudyLog, parse_methods  # noqa: E402

COLUMNS = ("Views", "kNN", "Cls", "Loc", "ObjLoc")
# Seconds per pretraining step at the defaults on one CPU core (docs/BENCHMARKS.md): the
# scheduling order, longest first.
STEP_COST = {"moco_v2": 1.3, "insloc_c4": 1.75, "insloc_fpn": 2.9, "detco": 5.2}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--seeds", type=int, default=3, help="pretraining seeds per method (1..N)")
    p.add_argument(
        "--pretrain-iters",
        type=int,
        default=128,
        help="128 x 32 = 4,096 samples (timings: docs/BENCHMARKS.md)",
    )
    p.add_argument("--pretrain-batch", type=int, default=32)
    p.add_argument("--pretrain-lr", type=float, default=0.06)
    p.add_argument(
        "--momentum",
        type=float,
        default=0.99,
        help="m of the key encoder: 0.999 barely moves it in a few hundred steps",
    )
    p.add_argument(
        "--queue-size",
        type=int,
        default=512,
        help="K, well below the pool: older keys of the same image are false negatives",
    )
    p.add_argument(
        "--mlp-norm",
        default="BN",
        choices=("", "BN"),
        help="MODEL.CONTRAST.MLP_NORM: without BN the projection heads collapse in "
        "short schedules (see the README)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=64,
        help="MoCo v2 / DetCo view side and InsLoc canvas side (pixels)",
    )
    p.add_argument(
        "--readout-cells-images",
        type=int,
        default=400,
        help="training images for the cell readouts (Loc, ObjLoc); all for kNN/Cls",
    )
    p.add_argument(
        "--roi-pooler",
        type=int,
        default=7,
        help="RoIAlign side of InsLoc-C4's pretraining boxes and of the C4 cell "
        "readouts (the detector's 14 resamples the 2-4 res4 cells of a box on a "
        "64-96 px image to 14 x 14, at 1.8x the cost of InsLoc-C4's step)",
    )
    p.add_argument(
        "--precise-bn",
        type=int,
        default=512,
        help="re-estimate BN statistics on this many readout training images (every "
        "model, random init too; 0: the checkpoint's)",
    )
    p.add_argument("--finetune-iters", type=int, default=0, help="> 0: also fine-tune demo_det")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-gpus", type=int, default=1, help="processes per pretraining run")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (CPU: one per core)")
    p.add_argument("--output-dir", default="output/mini_benchmark")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------
# Pretraining
# ------------------------------------------------------------------------------------------
def pretrain_command(method: str, seed: int, args, out: str, pool: str):
    s = args.image_size
    opts = [
        "SEED",
        str(seed),
        "SOLVER.WARMUP_ITERS",
        str(max(1, args.pretrain_iters // 20)),
        "MODEL.CONTRAST.MOMENTUM",
        str(args.momentum),
        "MODEL.CONTRAST.MLP_NORM",
        args.mlp_norm,
        "MODEL.CONTRAST.MLP_HIDDEN_DIM",
        "2048",
    ]
    if method == "insloc_c4":
        opts += ["MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", str(args.roi_pooler)]
    if method.startswith("insloc"):
        opts += [
            "INPUT.PRETRAIN.COPY_PASTE.CANVAS_SIZE",
            str(s),
            "INPUT.PRETRAIN.COPY_PASTE.PASTE_SIZE",
            f"({s // 2}, {s - 1})",
        ]
    else:
        opts += ["INPUT.PRETRAIN.CROP_SIZE", str(s)]
    return mini_runs.pretrain_command(
        method,
        out,
        f"folder:{pool}",
        args.pretrain_iters,
        args.pretrain_batch,
        args.pretrain_lr,
        args.queue_size,
        args.device,
        args.num_gpus,
        checkpoint_period=args.pretrain_iters,  # the final checkpoint only
        opts=opts,
    )


def pretrain(method: str, seed: int, args, pool: str) -> str:
    """Run (or find) one pretraining run (one thread); returns its final checkpoint."""
    out = os.path.abspath(os.path.join(args.output_dir, "pretrain", f"{method}_seed{seed}"))
    cmd = pretrain_command(method, seed, args, out, pool)
    return mini_runs.pretrain(cmd, out, f"pretraining {method} seed {seed}", threads=1)


def pretext_summary(run_dir: str, queue_size: int) -> dict:
    """Last logged loss and contrastive top-1 of the final stage, with chance ln(K + 1)."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        return {}
    every = [json.loads(ln) for ln in open(path) if ln.strip()]
    records = [r for r in every if "total_loss" in r]
    if not records:
        return {}
    last = records[-1]
    # Accuracies are written every SOLVER.LOG_PERIOD, not on every record: the last that has them.
    with_acc = [r for r in every if any(k.startswith("[metric]acc/") for k in r)]
    accs = {k: v for k, v in (with_acc or [{}])[-1].items() if k.startswith("[metric]acc/")}
    # The image-level term of the deepest level: MoCo v2's only term, InsLoc's P5 / res4,
    # DetCo's global res5 term.
    preferred = ("acc/moco", "acc/insloc_p5", "acc/insloc_res4", "acc/res5_gg")
    key = next((k for k in accs for p in preferred if k.endswith(p)), None)
    return {
        "total_loss": last["total_loss"],
        "acc_key": key,
        "acc_top1": accs.get(key),
        "chance_loss": math.log(queue_size + 1),
    }


# ------------------------------------------------------------------------------------------
# Readouts (in worker processes, one thread each)
# ------------------------------------------------------------------------------------------
def _features(encoder, train, val, cells_images: int, transform, boxes):
    """One frozen-feature pass per image: the first ``cells_images`` training images with their
    cell boxes, then the rest; the val images with their cell boxes.
    Returns (cells' training features, all training features, val features)."""
    import torch

    from insloc_detco.readout.features import extract_features

    cells = extract_features(
        encoder, train[:cells_images], transform, ("res5",), boxes, num_workers=0
    )
    rest = extract_features(encoder, train[cells_images:], transform, ("res5",), num_workers=0)
    every = {
        "index": torch.cat([cells["index"], rest["index"] + len(cells["index"])]),
        "res5": torch.cat([cells["res5"], rest.get("res5", cells["res5"][:0])]),
    }
    val_features = extract_features(encoder, val, transform, ("res5",), boxes, num_workers=0)
    return cells, every, val_features


def readout_model(
    weights: str,
    seed: int,
    cells_images: int,
    pooler: int,
    precise_bn: int,
    view_size: int,
    device: str,
) -> dict:
    """Views, kNN, Cls, Loc and ObjLoc of one checkpoint (or random init with ``seed``), by the
    readout protocols' functions on one feature extraction; the views at ``view_size``, the
    pretraining's view side."""
    import torch
    from detectron2.data import MetadataCatalog

    torch.set_num_threads(1)
    from insloc_detco.readout.datasets import get_readout_dataset
    from insloc_detco.readout.encoder import build_readout_encoder
    from insloc_detco.readout.features import eval_transform, image_batches
    from insloc_detco.readout.linear import LinearRecipe
    from insloc_detco.readout.localization import grid_boxes
    from insloc_detco.readout.protocols import (
        ReadoutData,
        cell_metrics,
        knn_metrics,
        linear_metrics,
    )
    from insloc_detco.readout.views import view_retrieval

    train, classes = get_readout_dataset("demo_cls_train")
    val, _ = get_readout_dataset("demo_cls_val")
    size = MetadataCatalog.get("demo_cls_train").image_size
    data = ReadoutData(train, val, classes, size, size)
    opts = ["MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", str(pooler)]
    encoder, report = build_readout_encoder(weights, "c4", device, seed, opts)
    tf = eval_transform(size, size)
    start = time.process_time()
    if precise_bn > 0:
        encoder.recompute_bn_statistics(image_batches(train[:precise_bn], tf, 64))
    f_cells, f_train, f_val = _features(
        encoder, train, val, cells_images, tf, grid_boxes(size, size, 3)
    )
    # Cached features: standardised, so one learning rate fits random and pretrained features.
    recipe = LinearRecipe(normalize="standardize", seed=seed)
    out = {
        "Views": view_retrieval(encoder, val, view_size, ("res5",))["top1_res5"],
        "kNN": knn_metrics(f_train, f_val, data, (20,), 0.07, encoder.device)["top1@k20"],
        "Cls": linear_metrics(f_train, f_val, data, recipe)["top1"],
    }
    cells = dataclasses.replace(data, train=train[:cells_images])
    out.update(cell_metrics(f_cells, f_val, cells, 3, recipe))
    return {
        "metrics": out,
        "weights_loaded": report.summary(),
        "cpu_s": round(time.process_time() - start, 1),
    }


# ------------------------------------------------------------------------------------------
# Detection fine-tune (optional)
# ------------------------------------------------------------------------------------------
def finetune(method: str, seed: int, weights: str, args) -> dict:
    """AP and friends (means) of one fine-tuning trial of ``weights``, seed ``seed``."""
    out = os.path.abspath(os.path.join(args.output_dir, "finetune", f"{method}_seed{seed}"))
    result = mini_runs.finetune(
        weights, out, args.finetune_iters, 4, 0.02, 1, seed, args.device, args.num_gpus, threads=1
    )
    return {k: v["mean"] for k, v in result["summary"].items()}


# ------------------------------------------------------------------------------------------
# Table
# ------------------------------------------------------------------------------------------
def summarize(runs: dict, columns) -> dict:
    from insloc_detco.engine.runs import mean_std

    out = {}
    for method, seeds in runs.items():
        out[method] = {}
        for c in columns:
            values = [r["metrics"][c] for r in seeds.values() if c in r.get("metrics", {})]
            if values:
                out[method][c] = mean_std(values)
        acc = [
            r["pretext"]["acc_top1"]
            for r in seeds.values()
            if r.get("pretext", {}).get("acc_top1") is not None
        ]
        if acc:
            out[method]["pretext top-1"] = mean_std(acc)
    return out


# ------------------------------------------------------------------------------------------
# The study
# ------------------------------------------------------------------------------------------
def read_out_all(methods, args, pool: str, previous: dict, log: StudyLog) -> dict:
    """
    Pretrain every (method, seed) and read every checkpoint out, reusing the readouts in
    ``previous`` (the runs of an earlier results.json) computed with the same settings.
    Returns method -> seed -> {"metrics", "weights", "readout", "pretext", ...}.
    """
    seeds = list(range(1, args.seeds + 1))
    # What a cached readout must have been computed with (readout_model's arguments in order).
    settings = {
        "cells_images": args.readout_cells_images,
        "roi_pooler": args.roi_pooler,
        "precise_bn": args.precise_bn,
        "view_size": args.image_size,
    }
    runs = {m: {} for m in methods}

    def cached(m, s, ckpt):
        done = previous.get(m, {}).get(str(s))
        if (
            done
            and set(COLUMNS) <= set(done.get("metrics", {}))
            and done.get("weights") == ckpt
            and done.get("readout") == settings
        ):
            return done
        return None

    # One pool for everything: pretraining runs longest first (the tail is then short), each
    # checkpoint's readout queued as soon as it exists, random init's behind the pretraining;
    # no core idles while another run finishes. Every run and readout is seeded, so the order
    # changes no number.
    order = sorted((m for m in methods if METHODS[m]), key=lambda m: -STEP_COST[m])
    with ProcessPoolExecutor(max_workers=args.jobs) as ex:

        def read_out(m, s, ckpt):
            fut = ex.submit(readout_model, ckpt, s, *settings.values(), args.device)
            pending[fut] = ("readout", m, s, ckpt)

        pending = {
            ex.submit(pretrain, m, s, args, pool): ("pretrain", m, s, None)
            for m in order
            for s in seeds
        }
        for m in (m for m in methods if not METHODS[m]):
            for s in seeds:
                done = cached(m, s, "random")
                if done:
                    runs[m][str(s)] = done
                else:
                    read_out(m, s, "random")
        while pending:
            fut = next(as_completed(pending))
            kind, m, s, ckpt = pending.pop(fut)
            result = fut.result()
            if kind == "pretrain":
                log(f"{m} seed {s}: pretrained ({result})")
                done = cached(m, s, result)
                if done is None:
                    read_out(m, s, result)
                    continue
                result, ckpt = done, result
            result.update(weights=ckpt, readout=settings)
            if ckpt != "random":
                result["pretext"] = pretext_summary(os.path.dirname(ckpt), args.queue_size)
            runs[m][str(s)] = result
            log(f"{m} seed {s}: {result['metrics']}")
    return {m: dict(sorted(r.items(), key=lambda kv: int(kv[0]))) for m, r in runs.items()}


def main(argv=None):
    args = parse_args(argv)
    methods = parse_methods(args.methods)
    os.makedirs(args.output_dir, exist_ok=True)
    log = StudyLog("mini_benchmark")

    from insloc_detco.readout.demo_cls import demo_cls_root, ensure_demo_cls

    root = ensure_demo_cls(demo_cls_root())
    pool = os.path.join(root, "train")  # the labelled set's training images, labels unused
    log(f"pretraining pool {pool}; methods {methods}; seeds {list(range(1, args.seeds + 1))}")
    results_path = os.path.join(args.output_dir, "results.json")
    previous = json.load(open(results_path)).get("runs", {}) if os.path.isfile(results_path) else {}
    runs = read_out_all(methods, args, pool, previous, log)
    columns = COLUMNS
    if args.finetune_iters > 0:
        for m, by_seed in runs.items():
            for s, r in by_seed.items():
                r["metrics"].update(finetune(m, int(s), r["weights"], args))
        columns += ("AP", "AP50")
    summary = summarize(runs, columns)
    md = mini_runs.table(summary, list(columns) + ["pretext top-1"], {m: args.seeds for m in runs})
    wall = log.wall()
    mini_runs.write_study(
        args.output_dir, "mini_benchmark", md, vars(args), wall, runs=runs, summary=summary
    )
    log(f"finished in {wall} s\n{md}")


if __name__ == "__main__":
    main()
