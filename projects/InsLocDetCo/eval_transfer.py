#!/usr/bin/env python
"""
How good is a pretrained backbone for detection? Convert, fine-tune, evaluate, tabulate.

    # list the benchmarks
    python eval_transfer.py --list
    # any recognised checkpoint -> detectron2 model-zoo .pkl (prints the detected format and
    # what was written / left out): ours, MoCo's .pth.tar, torchvision, InstanceLoc, DenseCL...
    python eval_transfer.py convert output/pretrain_insloc_fpn/model_final.pth insloc_fpn.pkl
    python eval_transfer.py convert moco_v2_200ep_pretrain.pth.tar moco_v2.pkl  # loads anywhere
    # one command: convert, fine-tune VOC 5 times and COCO FPN 1x once, write the table
    python eval_transfer.py run output/pretrain_insloc_fpn/model_final.pth \\
        --benchmark voc_c4_24k --benchmark coco_fpn_1x --num-gpus 8
    # CPU smoke test on the generated demo_det set (a few minutes)
    python eval_transfer.py run output/instant_test/pretrain_moco_v2/model_final.pth \\
        --benchmark demo_voc_c4
    # every trial as its own SLURM job (submitit); run again without --slurm to tabulate
    python eval_transfer.py run model_final.pth --benchmark coco_fpn_1x --slurm \\
        --gpus-per-node 8 --partition P --time 24:00:00

``run`` writes ``results.json`` and ``results.md`` (mean +- std over trials) in the output
folder (default: ``transfer/`` next to the checkpoint); re-running skips finished trials and
resumes unfinished ones, unless they were started with another config or weights (an error;
``--force`` starts them again). ``convert`` never replaces its input or a file that is not an
earlier conversion without ``--force``.
Trailing ``KEY VALUE`` pairs (e.g. ``SOLVER.IMS_PER_BATCH 8``) override the config of every
benchmark.
"""

import argparse
import os
import sys

from insloc_detco.engine import LaunchError, run_entry_point, setup_logging
from insloc_detco.engine.runs import Launch, add_launch_arguments, default_output_dir
from insloc_detco.transfer.benchmarks import benchmark_table, get_benchmark
from insloc_detco.transfer.converter import (
    TARGETS,
    ConversionError,
    check_output_path,
    convert_checkpoint,
    save_model_zoo_pkl,
)
from insloc_detco.transfer.runner import TransferError, run_benchmarks

TARGET_HELP = {
    "any": "layout-neutral ResNet names, loads into C4, FPN and RetinaNet detectors",
    "c4": "backbone.* + roi_heads.res5.*",
    "fpn": "backbone.bottom_up.* + backbone.fpn_* + roi_heads.box_head.*",
    "retinanet": "backbone.bottom_up.* + backbone.fpn_* (P3-P5)",
}


def convert(args):
    check_output_path(args.output, args.input, args.force)  # before reading a large input
    conversion, info = convert_checkpoint(args.input, args.target)
    save_model_zoo_pkl(
        conversion,
        args.output,
        source=info["source"],
        iteration=info["iteration"],
        force=args.force,
    )
    print(f"Detected: {conversion.source_format}")
    print(conversion.table())
    print(
        f"Wrote {len(conversion.model)} tensors to {args.output} "
        f"(target '{conversion.target}': {TARGET_HELP[conversion.target]})"
    )


def run(args):
    if not args.weights:
        raise TransferError("Give the pretraining checkpoint (.pth) or a converted .pkl.")
    if not args.benchmark:
        raise TransferError("Name at least one --benchmark (see --list).")
    try:
        benchmarks = [get_benchmark(n) for names in args.benchmark for n in names.split(",")]
    except KeyError as e:
        raise TransferError(e.args[0]) from None
    output_dir = args.output_dir or default_output_dir(args.weights, "transfer")
    launch = Launch.from_args(args)
    results = run_benchmarks(
        args.weights,
        benchmarks,
        output_dir,
        trials=args.trials,
        seed=args.seed,
        opts=args.opts,
        launch=launch,
        force=args.force,
    )
    if not launch.collects_results:  # under torchrun: ranks > 0
        return
    pending = [b.name for b in benchmarks if b.name not in results]
    if pending:  # trials submitted as SLURM jobs (logged above with their ids)
        print(
            f"Trials of {', '.join(pending)} were submitted as SLURM jobs; when they have "
            "finished, run the same command without --slurm to write the table."
        )
    else:
        print(f"Results: {os.path.join(output_dir, 'results.md')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    sub = parser.add_subparsers(dest="command")

    c = sub.add_parser("convert", help="any recognised checkpoint -> detectron2 .pkl")
    c.add_argument(
        "input",
        help="a checkpoint: ours, MoCo, InstanceLoc, DenseCL, torchvision, "
        "detectron2 (.pth, .pth.tar, .pkl)",
    )
    c.add_argument("output", help="the .pkl to write")
    c.add_argument(
        "--target",
        choices=("auto",) + TARGETS,
        default="auto",
        help="detector layout: "
        + "; ".join(f"{k}: {v}" for k, v in TARGET_HELP.items())
        + ". auto: fpn for an FPN / box head (InsLoc-FPN), c4 for InsLoc-C4, else any",
    )
    c.add_argument(
        "--force",
        action="store_true",
        help="replace OUTPUT even if it is the input or not an earlier conversion",
    )

    r = sub.add_parser("run", help="convert, fine-tune, evaluate, tabulate")
    r.add_argument(
        "weights",
        nargs="?",
        help="any checkpoint `convert` takes (it is converted for each benchmark), or 'random' "
        "(no pretraining)",
    )
    r.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    r.add_argument(
        "--benchmark",
        action="append",
        default=[],
        help="benchmark name (repeat or comma-separate) or a transfer config file",
    )
    r.add_argument(
        "--trials",
        type=int,
        default=None,
        help="fine-tunes per benchmark with seeds seed, seed+1, ... (default: the benchmark's)",
    )
    r.add_argument("--seed", type=int, default=1, help="seed of the first trial")
    r.add_argument("--output-dir", default=None, help="default: transfer/ next to the checkpoint")
    add_launch_arguments(r, slurm=True)
    r.add_argument(
        "--force",
        action="store_true",
        help="start again trials begun with another config or weights (the old "
        "folder is kept beside them); without it that is an error",
    )
    # Trailing KEY VALUE pairs (detectron2 style) are what parse_known_args leaves over.
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "run" or any(x.startswith("--") for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.opts = extra
    setup_logging(None)
    if args.list or getattr(args, "list", False):
        print(benchmark_table())
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        {"convert": convert, "run": run}[args.command](args)
    except (ConversionError, TransferError, LaunchError) as e:
        print(f"eval_transfer.py {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run_entry_point(main)
