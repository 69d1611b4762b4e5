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

from insloc_detco.engine.launch import (
    LaunchError,
    add_launch_arguments,
    is_launch_leader,
    launch,
    run_entry_point,
)
from insloc_detco.engine.slurm import add_slurm_arguments, submit
from insloc_detco.transfer.benchmarks import benchmark_table, get_benchmark
from insloc_detco.transfer.converter import (
    TARGETS,
    ConversionError,
    check_output_path,
    convert_checkpoint,
    save_model_zoo_pkl,
)
from insloc_detco.transfer.runner import (
    RANDOM_INIT,
    TransferError,
    run_benchmarks,
    run_trial,
    setup_console_logging,
)

TARGET_HELP = {
    "any": "layout-neutral ResNet names, loads into C4, FPN and RetinaNet detectors",
    "c4": "backbone.* + roi_heads.res5.*",
    "fpn": "backbone.bottom_up.* + backbone.fpn_* + roi_heads.box_head.*",
    "retinanet": "backbone.bottom_up.* + backbone.fpn_* (P3-P5)",
}


def convert(args):
    check_output_path(args.output, args.input, args.force)  # before reading a large input
    conversion, info = convert_checkpoint(args.input, args.target)
    save_model_zoo_pkl(conversion, args.output, source=info["source"],
                       iteration=info["iteration"], force=args.force)  # fmt: skip
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
    if args.weights == RANDOM_INIT:
        default_dir = os.path.join("output", "transfer_random_init")
    else:
        default_dir = os.path.join(os.path.dirname(os.path.abspath(args.weights)), "transfer")
    output_dir = args.output_dir or default_dir
    submitted = []

    def submit_trial(cfg, info):
        folder = os.path.join(cfg.OUTPUT_DIR, "submitit")
        job = submit(run_trial_job, (cfg, info), args, folder,
                     f"{info['benchmark']}-trial{info['trial']}")  # fmt: skip
        submitted.append(f"{job.job_id} ({folder})")

    run_benchmarks(
        args.weights,
        benchmarks,
        output_dir,
        trials=args.trials,
        seed=args.seed,
        opts=args.opts,
        num_gpus=args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        force=args.force,
        submit_trial=submit_trial if args.slurm else None,
    )
    if submitted:
        print(f"Submitted {len(submitted)} trial job(s): " + ", ".join(submitted))
        print("When they have finished, run the same command without --slurm to write the table.")
    elif is_launch_leader(args.machine_rank):
        print(f"Results: {os.path.join(output_dir, 'results.md')}")


def run_trial_job(cfg, info):
    """One trial in the tasks of a SLURM job (they join the job's process group)."""
    setup_console_logging()
    launch(run_trial, 1, args=(cfg, info))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    sub = parser.add_subparsers(dest="command")

    c = sub.add_parser("convert", help="any recognised checkpoint -> detectron2 .pkl")
    c.add_argument("input", help="a checkpoint: ours, MoCo, InstanceLoc, DenseCL, torchvision, "
                   "detectron2 (.pth, .pth.tar, .pkl)")  # fmt: skip
    c.add_argument("output", help="the .pkl to write")
    c.add_argument(
        "--target", choices=("auto",) + TARGETS, default="auto",
        help="detector layout: " + "; ".join(f"{k}: {v}" for k, v in TARGET_HELP.items())
        + ". auto: fpn for an FPN / box head (InsLoc-FPN), c4 for InsLoc-C4, else any",
    )  # fmt: skip
    c.add_argument("--force", action="store_true",
                   help="replace OUTPUT even if it is the input or not an earlier conversion")

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
    r.add_argument("--num-gpus", type=int, default=1, help="processes per machine")
    r.add_argument("--num-machines", type=int, default=1)
    r.add_argument("--machine-rank", type=int, default=0)
    r.add_argument("--dist-url", default="auto", help="e.g. tcp://HOST:PORT with several machines")
    r.add_argument("--force", action="store_true",
                   help="start again trials begun with another config or weights (the old "
                   "folder is kept beside them); without it that is an error")  # fmt: skip
    add_launch_arguments(r)
    add_slurm_arguments(r)
    # Trailing KEY VALUE pairs (detectron2 style) are what parse_known_args leaves over.
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "run" or any(x.startswith("--") for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.opts = extra
    setup_console_logging()
    if args.list or getattr(args, "list", False):
        print(benchmark_table())
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "dist_timeout", None) is not None:
        os.environ["INSLOC_DIST_TIMEOUT"] = str(args.dist_timeout)  # read by every launch
    try:
        {"convert": convert, "run": run}[args.command](args)
    except (ConversionError, TransferError, LaunchError) as e:
        print(f"eval_transfer.py {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run_entry_point(main)
