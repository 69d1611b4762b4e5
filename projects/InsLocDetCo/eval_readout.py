#!/usr/bin/env python
"""
What did pretraining learn? Frozen-feature readouts of a pretraining checkpoint, a converted
.pkl, or random init ("random"), one command per protocol:

    # kNN (weighted, k 20/200, T 0.07) on ImageNet: minutes
    python eval_readout.py knn output/pretrain_moco_v2/model_final.pth --num-gpus 8
    # MoCo's linear classification protocol (lr 30, 100 epochs, batch 256, augmentation)
    python eval_readout.py linear output/pretrain_moco_v2/model_final.pth --num-gpus 8
    # InsLoc's linear localization readout (M = 9 cells, R50-C4 head) + Cls on cached res5
    python eval_readout.py loc output/pretrain_insloc_c4/model_final.pth --num-gpus 8
    # DetCo's per-stage VOC07 SVMs (res2..res5, pooled to ~9k dimensions, all-point mAP)
    python eval_readout.py svm output/pretrain_detco/model_final.pth --num-gpus 8
    # augmented-view retrieval on held-out images: what the pretext task trains, no labels
    python eval_readout.py views output/pretrain_moco_v2/model_final.pth random \
        --train imagenet_cls_train --val imagenet_cls_val --precise-bn 2048
    # the generated labelled set, CPU, minutes: pretrained next to random init
    python eval_readout.py knn model_final.pth random --train demo_cls_train --val demo_cls_val \
        --output-dir output/readout
    # one table of every readout in result folders, a row per weights file, with chance levels
    python eval_readout.py table output/readout
    # under torchrun (or srun) each process joins the job: 8 processes, one per GPU
    torchrun --nproc_per_node 8 eval_readout.py knn output/pretrain_moco_v2/model_final.pth

Data sets (``--train`` / ``--val``) resolve under ``$DETECTRON2_DATASETS`` like detectron2's:
``imagenet_cls_{train,val}`` (folder per class), ``voc_2007_{trainval,test}``,
``class_folder:PATH``, ``demo_cls_{train,val}`` (generated, no download). Every weights file
gets ``results.json`` / ``results.md`` in ``readout/`` next to it (``--output-dir``: one folder
for all). Trailing ``KEY VALUE`` pairs override the readout network's detectron2 config.
"""

import argparse
import os
import sys

from insloc_detco.engine import LaunchError, run_entry_point, setup_logging
from insloc_detco.engine.runs import Launch, add_launch_arguments, read_json
from insloc_detco.readout.encoder import LAYOUTS, STAGES, ReadoutError
from insloc_detco.readout.linear import LinearRecipe
from insloc_detco.readout.protocols import PROTOCOLS, ReadoutSettings
from insloc_detco.readout.results import comparison_table, markdown_tables
from insloc_detco.readout.runner import run_readouts
from insloc_detco.readout.svm import DEFAULT_COSTS
from insloc_detco.transfer.converter import ConversionError


def _ints(s: str):
    return tuple(int(x) for x in s.split(",") if x)


def _floats(s: str):
    return tuple(float(x) for x in s.split(",") if x)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="protocol")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("weights", nargs="+", help="pretraining .pth, converted .pkl, or random")
    common.add_argument("--train", help="labelled training set (default: the paper's)")
    common.add_argument("--val", help="labelled evaluation set (default: the paper's)")
    common.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="c4",
        help="readout network: c4 (ResNet + res5 head, every method converts "
        "completely) or fpn (+ FPN and 4conv1fc box head)",
    )
    common.add_argument(
        "--resize",
        type=int,
        default=None,
        help="shorter side before the centre crop (default: the data set's image_size, else 256)",
    )
    common.add_argument("--crop", type=int, default=None, help="default: image_size, else 224")
    common.add_argument("--batch-size", type=int, default=64, help="images per process, features")
    common.add_argument("--num-workers", type=int, default=4)
    common.add_argument("--max-train-images", type=int, default=0, help="> 0: a quick subset")
    common.add_argument(
        "--precise-bn",
        type=int,
        default=0,
        metavar="N",
        help="re-estimate BN statistics on N training images first (0: the "
        "checkpoint's, as the papers)",
    )
    common.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--output-dir", default=None, help="default: readout/ next to weights")
    common.add_argument(
        "--feature-dir",
        default=None,
        help="knn, linear --cached, loc: where each process writes its features "
        "(default: <output dir>/features; removed when done)",
    )
    common.add_argument(
        "--feature-dtype",
        choices=("float32", "float16"),
        default="float32",
        help="of the features on disk (float16: half the disk)",
    )
    common.add_argument("--keep-features", action="store_true", help="leave them on disk")
    add_launch_arguments(common)

    classifier = argparse.ArgumentParser(add_help=False)
    r = LinearRecipe()
    classifier.add_argument("--epochs", type=int, default=r.epochs)
    classifier.add_argument("--lr", type=float, default=r.lr)
    classifier.add_argument("--momentum", type=float, default=r.momentum)
    classifier.add_argument("--weight-decay", type=float, default=r.weight_decay)
    classifier.add_argument(
        "--classifier-batch-size",
        type=int,
        default=r.batch_size,
        help="global batch of the linear classifier",
    )
    classifier.add_argument(
        "--milestones",
        type=_ints,
        default=r.milestones,
        help="epochs where lr /= 10, comma-separated",
    )
    classifier.add_argument(
        "--normalize",
        choices=("none", "standardize"),
        default=r.normalize,
        help="standardise cached features with training statistics",
    )

    k = sub.add_parser("knn", parents=[common], help="weighted kNN on pooled res5")
    k.add_argument("--k", type=_ints, default=(20, 200), help="comma-separated")
    k.add_argument("--temperature", type=float, default=0.07)
    lin = sub.add_parser("linear", parents=[common, classifier], help="linear classification")
    lin.add_argument(
        "--cached",
        action="store_true",
        help="train on features extracted once, without augmentation (fast)",
    )
    loc = sub.add_parser("loc", parents=[common, classifier], help="linear localization (InsLoc)")
    loc.add_argument("--grid", type=int, default=3, help="g: M = g x g cells")
    t = sub.add_parser("table", help="compare the readouts found in result folders")
    t.add_argument("dirs", nargs="+", help="folders with a readout results.json")
    s = sub.add_parser("svm", parents=[common], help="per-stage VOC07 SVMs (DetCo)")
    s.add_argument("--stages", type=lambda x: tuple(x.split(",")), default=STAGES)
    s.add_argument(
        "--costs",
        type=_floats,
        default=DEFAULT_COSTS,
        help="cost sweep (default: DetCo's 1,10,100 and 0.5^4 ... 0.5^19)",
    )
    s.add_argument(
        "--folds",
        type=int,
        default=3,
        help="stratified cross-validation folds that choose the cost",
    )
    s.add_argument(
        "--svm-jobs", type=int, default=-1, help="processes fitting the SVMs (-1: one per CPU)"
    )
    v = sub.add_parser(
        "views",
        parents=[common],
        help="augmented-view retrieval on the validation images (pretext task)",
    )
    v.add_argument("--stages", type=lambda x: tuple(x.split(",")), default=("res4", "res5"))
    return parser


def settings_from_args(args, opts) -> ReadoutSettings:
    import torch

    train, val = PROTOCOLS[args.protocol].data  # the papers' data
    s = ReadoutSettings(
        protocol=args.protocol,
        train=args.train or train,
        val=args.val or val,
        layout=args.layout,
        resize=args.resize,
        crop=args.crop,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        seed=args.seed,
        max_train_images=args.max_train_images,
        precise_bn=args.precise_bn,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        opts=opts,
        feature_dir=args.feature_dir,
        feature_dtype=args.feature_dtype,
        keep_features=args.keep_features,
    )
    if args.protocol == "knn":
        s.ks, s.temperature = args.k, args.temperature
    if args.protocol in ("linear", "loc"):
        s.recipe = LinearRecipe(
            epochs=args.epochs,
            lr=args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            batch_size=args.classifier_batch_size,
            milestones=args.milestones,
            normalize=args.normalize,
            seed=args.seed,
        )
    if args.protocol == "linear":
        s.cached = args.cached
    if args.protocol == "loc":
        s.grid = args.grid
    if args.protocol == "svm":
        s.stages, s.costs, s.folds, s.svm_jobs = args.stages, args.costs, args.folds, args.svm_jobs
    if args.protocol == "views":
        s.stages = args.stages
    return s


def print_table(dirs) -> int:
    results = {}
    for d in dirs:
        path = os.path.join(d, "results.json")
        if not os.path.isfile(path):
            print(f"eval_readout.py table: error: no {path}", file=sys.stderr)
            return 2
        results.update(read_json(path))
    print(comparison_table(results), end="")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args, opts = parser.parse_known_args(argv)
    if args.protocol is None:
        parser.print_help()
        return 2
    if any(x.startswith("--") for x in opts) or len(opts) % 2:
        parser.error(f"unrecognized arguments: {' '.join(opts)}")
    if args.protocol == "table":
        return print_table(args.dirs)
    setup_logging(None)
    try:
        s = settings_from_args(args, opts)
        launch = Launch.from_args(args)
        entries = run_readouts(args.weights, s, args.output_dir, launch)
    except (ReadoutError, ConversionError, ValueError, FloatingPointError, LaunchError) as e:
        print(f"eval_readout.py {args.protocol}: error: {e}", file=sys.stderr)
        return 2
    if launch.collects_results:  # under torchrun: rank 0
        print(markdown_tables({str(i): e for i, e in enumerate(entries)}))
    return 0


if __name__ == "__main__":
    run_entry_point(main)
