"""
Which evaluator scores a benchmark, and what it needs, checked before any training starts.

The evaluator follows from the test set's ``evaluator_type``, as in detectron2's
``tools/train_net.py``:

- ``pascal_voc``: ``PascalVOCDetectionEvaluator``, box AP.
- ``coco``: ``COCOEvaluator``, box, mask and keypoint AP (keypoints: one OKS sigma each).
- ``cityscapes_instance``: ``CityscapesInstanceEvaluator``, mask AP and AP50 from
  cityscapesScripts' evaluation. It needs ``cityscapesscripts`` and works on one machine only
  (the processes write their predictions to a temporary folder of the first one).

cityscapesScripts 2.3 (the latest) fails with NumPy 2.4: its instance evaluation calls
``numpy.in1d``, which NumPy removed (mcordts/cityscapesScripts pull request 196, open), and its
JSON writer cannot write the NumPy integers that ``count_nonzero`` now returns. While it
evaluates, :class:`_CityscapesInstanceEvaluator` gives it ``in1d`` (the flattened ``isin``) and
a writer that stores NumPy scalars as numbers; the writer also puts the ``matches.json`` that the
evaluation writes to the current directory in detectron2's temporary prediction folder.

Keypoint AP uses ``TEST.KEYPOINT_OKS_SIGMAS``; empty means COCO's 17 person sigmas (what
pycocotools uses by default), so any other keypoint set must give its own. Keypoint R-CNN
also needs each data set's ``keypoint_names`` (and for training ``keypoint_flip_map``: the
horizontal flip swaps left and right keypoints).
"""

import contextlib
import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Callable, List, Tuple

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    COCOEvaluator,
    PascalVOCDetectionEvaluator,
)

__all__ = ["EVALUATORS", "build_transfer_evaluator", "evaluation_problems"]

COCO_PERSON_KEYPOINTS = 17  # pycocotools' default OKS sigmas are COCO's person keypoints'


@dataclass(frozen=True)
class EvaluatorSpec:
    """
    Attributes:
        build: ``(cfg, dataset_name, output_folder) -> DatasetEvaluator``.
        packages: modules that detectron2's loader of such data sets and the evaluator
            import (checked up front).
        one_machine: whether it only works when all processes share one file system.
    """

    build: Callable
    packages: Tuple[str, ...] = ()
    one_machine: bool = False


@contextlib.contextmanager
def _cityscapes_numpy2(evaluation, folder: str):
    """
    Run cityscapesScripts' instance evaluation (module ``evaluation``) on NumPy >= 2.4 (see the
    module doc); relative JSON files go to ``folder``. Everything is restored afterwards.
    """

    def write_json(data, file_name):
        def default(o):
            return o.item() if isinstance(o, np.generic) else o.__dict__

        with open(os.path.join(folder, file_name), "w") as f:  # absolute names stay as given
            json.dump(data, f, default=default, sort_keys=True, indent=4)

    def in1d(ar1, ar2, assume_unique=False, invert=False):
        return np.isin(ar1, ar2, assume_unique=assume_unique, invert=invert).ravel()

    writer, added = evaluation.writeDict2JSON, not hasattr(np, "in1d")
    evaluation.writeDict2JSON = write_json
    if added:
        np.in1d = in1d
    try:
        yield
    finally:
        evaluation.writeDict2JSON = writer
        if added:
            del np.in1d


class _CityscapesInstanceEvaluator(CityscapesInstanceEvaluator):
    """detectron2's, evaluating under :func:`_cityscapes_numpy2` (see the module doc)."""

    def evaluate(self):
        import cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling as evaluation

        with _cityscapes_numpy2(evaluation, self._temp_dir):
            return super().evaluate()


EVALUATORS = {
    "pascal_voc": EvaluatorSpec(lambda cfg, name, out: PascalVOCDetectionEvaluator(name)),
    "coco": EvaluatorSpec(
        lambda cfg, name, out: COCOEvaluator(
            name, output_dir=out, kpt_oks_sigmas=tuple(cfg.TEST.KEYPOINT_OKS_SIGMAS)
        )
    ),
    "cityscapes_instance": EvaluatorSpec(
        lambda cfg, name, out: _CityscapesInstanceEvaluator(name),
        packages=("cityscapesscripts", "shapely"),
        one_machine=True,
    ),
}


def build_transfer_evaluator(cfg, dataset_name: str, output_folder: str):
    """The evaluator of test set ``dataset_name`` (its ``evaluator_type`` in ``EVALUATORS``)."""
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    if evaluator_type not in EVALUATORS:
        raise ValueError(_unknown_type(dataset_name, evaluator_type))
    return EVALUATORS[evaluator_type].build(cfg, dataset_name, output_folder)


def _unknown_type(dataset_name: str, evaluator_type) -> str:
    return (
        f"Test set '{dataset_name}' has evaluator_type={evaluator_type!r}; transfer benchmarks "
        f"evaluate {', '.join(repr(t) for t in EVALUATORS)} data sets."
    )


def evaluation_problems(cfg, num_machines: int = 1) -> List[str]:
    """
    What would make training or evaluation fail, found before either starts.

    Args:
        cfg: the benchmark's config (its test sets, ``MODEL.KEYPOINT_ON``...).
        num_machines: machines the trial will be launched on.
    Returns:
        one actionable message per problem (empty: none).
    """
    problems = []
    for name in cfg.DATASETS.TEST:
        evaluator_type = MetadataCatalog.get(name).get("evaluator_type", None)
        spec = EVALUATORS.get(evaluator_type)
        if spec is None:
            problems.append(_unknown_type(name, evaluator_type))
            continue
        missing = [p for p in spec.packages if importlib.util.find_spec(p) is None]
        if missing:
            problems.append(
                f"Test set '{name}' ('{evaluator_type}') is read and scored with "
                f"{' and '.join(missing)}, which are not installed: pip install "
                f"{' '.join(missing)} (scripts/setup_env.sh installs them)."
            )
        if spec.one_machine and num_machines > 1:
            problems.append(
                f"The '{evaluator_type}' evaluator of '{name}' (detectron2's) gathers the "
                "predictions in a temporary folder of the first machine: run it on one machine "
                f"(--num-machines 1, not {num_machines})."
            )
    if cfg.MODEL.KEYPOINT_ON:
        problems += _keypoint_problems(cfg)
    return problems


def _keypoint_problems(cfg) -> List[str]:
    num = cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS
    problems = []
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        meta = MetadataCatalog.get(name)
        names = meta.get("keypoint_names", None)
        if names is None or len(names) != num:
            problems.append(
                f"MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS is {num} but data set '{name}' names "
                f"{'no' if names is None else len(names)} keypoints (metadata keypoint_names)."
            )
        elif name in cfg.DATASETS.TRAIN and meta.get("keypoint_flip_map", None) is None:
            problems.append(
                f"Training set '{name}' has no keypoint_flip_map metadata: the horizontal "
                "flip of training images needs to know which keypoints swap (may be empty)."
            )
    sigmas = cfg.TEST.KEYPOINT_OKS_SIGMAS
    if len(sigmas) != num and (sigmas or num != COCO_PERSON_KEYPOINTS):
        problems.append(
            f"TEST.KEYPOINT_OKS_SIGMAS has {len(sigmas)} values for {num} keypoints: give one "
            f"OKS sigma per keypoint (empty only for COCO's {COCO_PERSON_KEYPOINTS} person "
            "keypoints, whose sigmas pycocotools knows)."
        )
    return problems
