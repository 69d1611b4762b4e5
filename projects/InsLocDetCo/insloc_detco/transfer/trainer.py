"""The fine-tuning trainer: detectron2's ``DefaultTrainer`` with VOC / COCO evaluators."""

import os

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator

from ..engine.trainer import DeviceAgnosticTrainer

__all__ = ["TransferTrainer"]


class TransferTrainer(DeviceAgnosticTrainer):
    """
    detectron2's ``DefaultTrainer`` (SGD, warmup + steps, PreciseBN, checkpoints with resume,
    evaluation after the last iteration; also on several CPU processes) with the evaluator
    chosen by the test set's ``evaluator_type``, as detectron2's ``tools/train_net.py`` does.
    """

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        if evaluator_type == "pascal_voc":
            return PascalVOCDetectionEvaluator(dataset_name)
        if evaluator_type == "coco":
            output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
            return COCOEvaluator(dataset_name, output_dir=output_folder)
        raise ValueError(
            f"Test set '{dataset_name}' has evaluator_type={evaluator_type!r}; transfer "
            "benchmarks evaluate 'pascal_voc' or 'coco' data sets."
        )
