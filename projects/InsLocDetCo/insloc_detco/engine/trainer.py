"""The pretraining trainer: detectron2's ``DefaultTrainer`` with an unlabeled data loader."""
import logging
import math
import os
from collections import OrderedDict

import torch
from detectron2.engine import DefaultTrainer, hooks
from detectron2.utils import comm

from ..data import build_pretrain_train_loader, get_pretrain_dataset_dicts
from .hooks import PlotCurvesHook, SkippedImagesHook

__all__ = ["PretrainTrainer", "resolve_epochs", "resolve_device", "resolve_config_file"]

logger = logging.getLogger(__name__)

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs")


class PretrainTrainer(DefaultTrainer):
    """
    Self-supervised pretraining with detectron2's loop: SGD + ``WarmupCosineLR`` from the
    config, ``REFERENCE_WORLD_SIZE`` scaling, AMP, DDP, periodic checkpoints with
    ``resume_or_load``, and detectron2's console / ``metrics.json`` / TensorBoard writers.
    There is no evaluation during pretraining: transfer is measured by ``eval_transfer.py``.
    """

    @classmethod
    def build_train_loader(cls, cfg):
        return build_pretrain_train_loader(cfg)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        return OrderedDict()

    def build_hooks(self):
        cfg = self.cfg
        ret = [hooks.IterationTimer(), hooks.LRScheduler()]
        ret.append(SkippedImagesHook(self.data_loader, cfg.SOLVER.LOG_PERIOD))
        if comm.is_main_process():
            ret.append(hooks.PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD))
            ret.append(hooks.PeriodicWriter(self.build_writers(), period=cfg.SOLVER.LOG_PERIOD))
            if cfg.SOLVER.PLOT_CURVES:
                ret.append(PlotCurvesHook(cfg.OUTPUT_DIR, cfg.SOLVER.CHECKPOINT_PERIOD))
        return ret


def resolve_epochs(cfg):
    """If ``SOLVER.EPOCHS`` > 0, set ``SOLVER.MAX_ITER`` from the training set size (in place)."""
    if cfg.SOLVER.EPOCHS <= 0:
        return cfg
    num_images = len(get_pretrain_dataset_dicts(cfg.DATASETS.TRAIN))
    cfg.SOLVER.MAX_ITER = math.ceil(cfg.SOLVER.EPOCHS * num_images / cfg.SOLVER.IMS_PER_BATCH)
    logger.info(
        f"SOLVER.EPOCHS={cfg.SOLVER.EPOCHS} over {num_images} images at batch "
        f"{cfg.SOLVER.IMS_PER_BATCH}: MAX_ITER={cfg.SOLVER.MAX_ITER}"
    )
    return cfg


def resolve_device(cfg):
    """Fall back to the CPU (in place) when the config asks for CUDA on a machine without it."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("CUDA is not available: training on the CPU (MODEL.DEVICE=cpu).")
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def resolve_config_file(path: str) -> str:
    """A path as given, else a name relative to the project's ``configs/`` folder."""
    if os.path.isfile(path):
        return path
    candidate = os.path.join(_CONFIG_DIR, path)
    if os.path.isfile(candidate):
        return candidate
    raise FileNotFoundError(
        f"Config '{path}' not found, neither as a path nor under {_CONFIG_DIR}."
    )
