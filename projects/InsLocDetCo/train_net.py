#!/usr/bin/env python
"""
Self-supervised pretraining with MoCo v2, InsLoc or DetCo.

    python train_net.py --config-file configs/pretrain_insloc_fpn.yaml --num-gpus 8
    python train_net.py --config-file pretrain_moco_v2.yaml SOLVER.IMS_PER_BATCH 128
    python train_net.py --config-file instant_test/pretrain_moco_v2.yaml --num-gpus 2   # CPU, gloo
    torchrun --nproc_per_node 8 train_net.py --config-file pretrain_insloc_fpn.yaml
    python train_net.py --config-file pretrain_detco.yaml --slurm --nodes 8 --gpus-per-node 8 \
        --partition P --time 72:00:00

A bare config name resolves under ``configs/``. Without a GPU the run uses the CPU, with
``--num-gpus N`` processes over gloo. Under torchrun, srun or a PyTorchJob each process joins
the job (docs/CLUSTERS.md); ``--slurm`` submits the command through submitit. A start resumes
by itself from the checkpoints in OUTPUT_DIR when they were written with the same config
(schedule, queues and momentum encoder included), and stops if they were not; ``--resume``
continues them even with another config; a new OUTPUT_DIR starts afresh. SIGTERM, SIGUSR1 or
SIGUSR2 during training save a checkpoint and exit (status 128 + signal). A
``SOLVER.IMS_PER_BATCH`` given here without ``SOLVER.BASE_LR`` scales the config's lr linearly
(``SOLVER.SCALE_LR_WITH_BATCH``).
"""

import logging
import os

import insloc_detco  # noqa: F401  (first: it silences known warnings of the libraries below)

# isort: split
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm

from insloc_detco import add_insloc_detco_config
from insloc_detco.engine import (
    PretrainTrainer,
    dist_timeout,
    launch,
    log_exceptions,
    merge_opts_scaling_lr,
    resolve_config_file,
    resolve_device,
    resolve_epochs,
    run_entry_point,
    setup_logging,
)
from insloc_detco.engine.runs import add_launch_arguments
from insloc_detco.engine.slurm import submit

logger = logging.getLogger("insloc_detco.train_net")


def load_config(args):
    cfg = get_cfg()
    add_insloc_detco_config(cfg)
    args.config_file = resolve_config_file(args.config_file)
    cfg.merge_from_file(args.config_file)
    return cfg, merge_opts_scaling_lr(cfg, args.opts)


def setup(args):
    cfg, lr_note = load_config(args)
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
        trainer.resume_or_load(resume=True, require_same_config=not args.resume)
    if trainer.start_iter >= trainer.max_iter:
        logger.info(f"{cfg.OUTPUT_DIR} holds the finished run of this config: nothing to train.")
    trainer.train()  # detectron2 logs an exception inside the loop itself
    logger.info(f"Pretrained weights: {cfg.OUTPUT_DIR}/model_final.pth")


def run(args):
    timeout = dist_timeout(args.dist_timeout)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        timeout=timeout,
    )


def submit_job(args):
    cfg, _ = load_config(args)
    folder = os.path.join(cfg.OUTPUT_DIR, "submitit")
    job = submit(
        run,
        (job_arguments(args),),
        args,
        folder,
        os.path.basename(os.path.normpath(cfg.OUTPUT_DIR)),
    )
    print(f"Submitted job {job.job_id}: {cfg.OUTPUT_DIR}/log.txt, job output in {folder}")


def job_arguments(args):
    """The command the job runs: this one, without --slurm."""
    job_args = type(args)(**vars(args))
    job_args.slurm = False
    return job_args


def build_parser():
    parser = default_argument_parser()  # detectron2's --num-gpus, --num-machines, ...
    add_launch_arguments(parser, processes=False, slurm=True)
    return parser


if __name__ == "__main__":
    args = build_parser().parse_args()
    print("Command Line Args:", args)
    run_entry_point(submit_job if args.slurm else run, args)
