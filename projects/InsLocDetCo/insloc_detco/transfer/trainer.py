"""The fine-tuning trainer: detectron2's ``DefaultTrainer`` with the benchmark's evaluator."""

import os

from ..engine.trainer import DeviceAgnosticTrainer
from .evaluators import build_transfer_evaluator

__all__ = ["TransferTrainer"]


class TransferTrainer(DeviceAgnosticTrainer):
    """
    detectron2's ``DefaultTrainer`` (SGD, warmup + steps, PreciseBN, checkpoints with resume,
    evaluation after the last iteration; also on several CPU processes) with the evaluator
    chosen by the test set's ``evaluator_type`` (:mod:`.evaluators`: VOC, COCO incl. keypoints,
    Cityscapes), as detectron2's ``tools/train_net.py`` does.
    """

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return build_transfer_evaluator(cfg, dataset_name, output_folder)
