#!/usr/bin/env python
"""
How good is a pretrained backbone for detection? Convert, fine-tune, evaluate, tabulate.

    # list the benchmarks
    python eval_transfer.py --list
    # pretraining checkpoint -> detectron2 model-zoo .pkl (prints what was written / left out)
    python eval_transfer.py convert output/pretrain_insloc_fpn/model_final.pth insloc_fpn.pkl \\
        --target fpn
    # one command: convert, fine-tune VOC 5 times and COCO FPN 1x once, write the table
    python eval_transfer.py run output/pretrain_insloc_fpn/model_final.pth \\
        --benchmark voc_c4_24k --benchmark coco_fpn_1x --num-gpus 8
    # CPU smoke test on the generated demo_det set (a few minutes)
    python eval_transfer.py run output/instant_test/pretrain_moco_v2/model_final.pth \\
        --benchmark demo_voc_c4

``run`` writes ``results.json`` and ``results.md`` (mean +- std over trials) in the output
folder (default: ``transfer/`` next to the checkpoint); re-running skips finished trials.
Trailing ``KEY VALUE`` pairs (e.g. ``SOLVER.IMS_PER_BATCH 8``) override the config of every
benchmark.
"""

import argparse
import os
import sys

from insloc_detco.transfer.benchmarks import benchmark_table, get_benchmark
from insloc_detco.transfer.converter import (
    TARGETS,
    ConversionError,
    convert_checkpoint,
    default_target,
    load_pretrain_checkpoint,
    save_model_zoo_pkl,
)
from insloc_detco.transfer.runner import (
    RANDOM_INIT,
    TransferError,
    run_benchmarks,
    setup_console_logging,
)


def convert(args):
    target = args.target
    if target == "auto":
        _, info = load_pretrain_checkpoint(args.input)
        target = default_target(info["meta_architecture"] or "")
    conversion, info = convert_checkpoint(args.input, target)
    save_model_zoo_pkl(conversion, args.output, source=info["source"], iteration=info["iteration"])
    print(conversion.table())
    print(f"Wrote {len(conversion.model)} tensors to {args.output}")


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
    )
    print(f"Results: {os.path.join(output_dir, 'results.md')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    sub = parser.add_subparsers(dest="command")

    c = sub.add_parser("convert", help="pretraining checkpoint -> detectron2 .pkl")
    c.add_argument("input", help="pretraining checkpoint (model_final.pth)")
    c.add_argument("output", help="the .pkl to write")
    c.add_argument(
        "--target", choices=("auto",) + TARGETS, default="auto",
        help="detector layout: c4 (backbone + roi_heads.res5), fpn (backbone.bottom_up + FPN + "
        "box head), retinanet; auto: fpn for InsLoc-FPN, else c4",
    )  # fmt: skip

    r = sub.add_parser("run", help="convert, fine-tune, evaluate, tabulate")
    r.add_argument(
        "weights",
        nargs="?",
        help="pretraining checkpoint (.pth), converted .pkl, or 'random' (no pretraining)",
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
    try:
        {"convert": convert, "run": run}[args.command](args)
    except (ConversionError, TransferError) as e:
        print(f"eval_transfer.py {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
