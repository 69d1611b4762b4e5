#!/usr/bin/env python
"""
Self-supervised pretraining with MoCo v2, InsLoc or DetCo.

    python train_net.py --config-file configs/pretrain_insloc_fpn.yaml --num-gpus 8
    python train_net.py --config-file pretrain_moco_v2.yaml SOLVER.IMS_PER_BATCH 128
    python train_net.py --config-file instant_test/pretrain_moco_v2.yaml --num-gpus 2   # CPU, gloo

A bare config name resolves under ``configs/``. Without a GPU the run uses the CPU, with
``--num-gpus N`` processes over gloo. ``--resume`` continues the newest readable checkpoint in
OUTPUT_DIR (schedule, queues and momentum encoder included). A ``SOLVER.IMS_PER_BATCH`` given
here without ``SOLVER.BASE_LR`` scales the config's lr linearly (``SOLVER.SCALE_LR_WITH_BATCH``).
"""
import logging

import insloc_detco  # noqa: F401  (first: it silences known warnings of the libraries below)

# isort: split
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm

from insloc_detco import add_insloc_detco_config
from insloc_detco.engine import (
    PretrainTrainer,
    launch,
    log_exceptions,
    merge_opts_scaling_lr,
    resolve_config_file,
    resolve_device,
    resolve_epochs,
    setup_logging,
)

logger = logging.getLogger("insloc_detco.train_net")


def setup(args):
    cfg = get_cfg()
    add_insloc_detco_config(cfg)
    args.config_file = resolve_config_file(args.config_file)
    cfg.merge_from_file(args.config_file)
    lr_note = merge_opts_scaling_lr(cfg, args.opts)
    setup_logging(cfg.OUTPUT_DIR, comm.get_rank())
    if lr_note:
        logger.info(lr_note)
    resolve_device(cfg)
    resolve_epochs(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    with log_exceptions("Setting up training", logger):  # errors before the loop reach log.txt
        trainer = PretrainTrainer(cfg)
        trainer.resume_or_load(resume=args.resume)
    trainer.train()  # detectron2 logs an exception inside the loop itself
    logger.info(f"Pretrained weights: {cfg.OUTPUT_DIR}/model_final.pth")


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
