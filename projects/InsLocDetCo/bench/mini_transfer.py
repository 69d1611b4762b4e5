#!/usr/bin/env python
"""
Mini transfer benchmark: does each pretext task learn something useful for detection?

Random init, MoCo v2, InsLoc-C4, InsLoc-FPN and DetCo are pretrained with the same budget
(iterations x batch, same unlabeled images) and fine-tuned with the same Mask R-CNN R50-FPN
recipe on the generated ``demo_det`` detection task (real-photo backgrounds), several seeds
each; prints AP / AP50 / AP75 / APmask as mean +- std.

    python bench/mini_transfer.py                     # CPU defaults (about an hour on 2 cores)
    python bench/mini_transfer.py --seeds 5 --pretrain-iters 2000 --pretrain-batch 64 \
        --finetune-iters 1000 --device cuda           # the same experiment, larger, on a GPU

Pretraining images (512 by default): the ``demo_det`` train images (labels unused), more images
generated like them with another seed, and the 18 scikit-image photos; the ``demo_det`` val
images are never seen before evaluation. Everything (runs, checkpoints, results.json,
mini_transfer.md) goes under ``--output-dir``; re-running skips finished pretraining runs and
fine-tuning trials. The measured table and what it shows: ``docs/BENCHMARKS.md``.
"""

import os
import sys
from argparse import ArgumentParser

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mini_runs  # noqa: E402
from mini_runs import FINETUNE_BENCHMARK, METHODS, StudyLog, parse_methods  # noqa: E402

COLUMNS = ("AP", "AP50", "AP75", "APmask")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning trials per method")
    p.add_argument("--pretrain-iters", type=int, default=200)
    p.add_argument("--pretrain-batch", type=int, default=16)
    p.add_argument("--pretrain-lr", type=float, default=0.03)
    p.add_argument(
        "--num-unlabeled",
        type=int,
        default=462,
        help="extra generated images in the pretraining pool (with the 32 demo_det "
        "train images and 18 photos: 512)",
    )
    p.add_argument(
        "--queue-size",
        type=int,
        default=128,
        help="keep it well below the pool size: older keys of the same image in the "
        "queue are false negatives",
    )
    p.add_argument("--finetune-iters", type=int, default=100)
    p.add_argument("--finetune-batch", type=int, default=4)
    p.add_argument("--finetune-lr", type=float, default=0.02)
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-gpus", type=int, default=1, help="processes per run")
    p.add_argument("--output-dir", default="output/mini_transfer")
    return p.parse_args(argv)


def pretraining_list(output_dir: str, num_unlabeled: int) -> str:
    """Write the unlabeled image list: demo_det train images, ``num_unlabeled`` more images
    drawn like them (another seed), and the scikit-image photos."""
    from detectron2.data import DatasetCatalog

    from insloc_detco.transfer.demo_det import write_unlabeled_images

    files = [d["file_name"] for d in DatasetCatalog.get("demo_det_coco_train")]
    pool = os.path.abspath(os.path.join(output_dir, "unlabeled"))  # the list needs full paths
    files += write_unlabeled_images(pool, num_unlabeled)
    files += [d["file_name"] for d in DatasetCatalog.get("pretrain_demo")]
    path = os.path.abspath(os.path.join(output_dir, "pretrain_images.txt"))
    with open(path, "w") as f:
        f.write("\n".join(files) + "\n")
    return path


def pretrain_command(method: str, args, out: str, image_list: str):
    return mini_runs.pretrain_command(
        method,
        out,
        f"list:{image_list}",
        args.pretrain_iters,
        args.pretrain_batch,
        args.pretrain_lr,
        args.queue_size,
        args.device,
        args.num_gpus,
        checkpoint_period=max(50, args.pretrain_iters // 4),
    )


def pretrain(method: str, args, image_list: str, log: StudyLog) -> str:
    """One (unseeded) pretraining run of ``method``; returns its final checkpoint."""
    out = os.path.abspath(os.path.join(args.output_dir, "pretrain", method))
    log(
        f"{method}: pretraining {args.pretrain_iters} iterations x {args.pretrain_batch} "
        f"images (log: {out}/log.txt)"
    )
    cmd = pretrain_command(method, args, out, image_list)
    return mini_runs.pretrain(cmd, out, f"{method}: pretraining", log=log)


def main(argv=None):
    args = parse_args(argv)
    methods = parse_methods(args.methods)
    os.makedirs(args.output_dir, exist_ok=True)
    log = StudyLog("mini_transfer")
    image_list = pretraining_list(args.output_dir, args.num_unlabeled)
    log(f"{sum(1 for _ in open(image_list))} pretraining images; methods: {methods}")
    checkpoints = {
        m: "random" if METHODS[m] is None else pretrain(m, args, image_list, log) for m in methods
    }
    results = {}
    for m in methods:
        log(
            f"{m}: fine-tuning {FINETUNE_BENCHMARK} x {args.seeds} seeds, "
            f"{args.finetune_iters} iterations each"
        )
        out = os.path.abspath(os.path.join(args.output_dir, "finetune", m))
        results[m] = mini_runs.finetune(
            checkpoints[m],
            out,
            args.finetune_iters,
            args.finetune_batch,
            args.finetune_lr,
            args.seeds,
            1,
            args.device,
            args.num_gpus,
        )
        log(f"{m}: done\n{table(results)}")
    md = table(results)
    mini_runs.write_study(
        args.output_dir, "mini_transfer", md, vars(args), log.wall(), results=results
    )
    log(f"finished in {log.wall()} s\n{md}")


def table(results: dict) -> str:
    stats = {m: r["summary"] for m, r in results.items()}
    return mini_runs.table(stats, COLUMNS, {m: len(r["trials"]) for m, r in results.items()})


if __name__ == "__main__":
    main()
