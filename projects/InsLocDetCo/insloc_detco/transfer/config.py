"""
Loading the transfer configs, which inherit detectron2's model-zoo baselines.

yacs resolves ``_BASE_`` relative to the YAML file, but the model-zoo baselines live inside the
installed detectron2 package. A transfer YAML therefore names its baseline with one extra key,

    _MODEL_ZOO_BASE_: "COCO-InstanceSegmentation/mask_rcnn_R_50_C4_1x.yaml"

(inherited through our own ``_BASE_`` chain like any other key), and :func:`load_transfer_config`
builds: detectron2 defaults <- that baseline (``model_zoo.get_config_file``, its own ``_BASE_``
resolved by detectron2) <- our YAML chain <- command-line overrides. The result has only stock
detectron2 keys, and every run dumps it, fully resolved, as ``config.yaml`` in its output
folder: detectron2's own ``tools/train_net.py --config-file <run>/config.yaml`` reproduces the
run (after ``import insloc_detco.transfer``, which registers our heads and data sets).
"""

import contextlib
import logging
import os
from typing import Sequence

from detectron2 import model_zoo
from detectron2.config import CfgNode, get_cfg

from ..engine.lr_scaling import merge_opts_scaling_lr

__all__ = [
    "MODEL_ZOO_BASE_KEY",
    "TRANSFER_CONFIG_DIR",
    "resolve_transfer_config",
    "load_transfer_config",
]

MODEL_ZOO_BASE_KEY = "_MODEL_ZOO_BASE_"
_PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRANSFER_CONFIG_DIR = os.path.join(_PROJECT_DIR, "configs", "transfer")


def resolve_transfer_config(name: str) -> str:
    """A path as given, else a name under ``configs/transfer/``, else under ``configs/``."""
    for candidate in (
        name,
        os.path.join(TRANSFER_CONFIG_DIR, name),
        os.path.join(_PROJECT_DIR, "configs", name),
    ):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        f"Transfer config '{name}' not found, neither as a path nor under {TRANSFER_CONFIG_DIR}."
    )


def load_transfer_config(name: str, opts: Sequence[str] = ()) -> CfgNode:
    """
    Args:
        name: a transfer YAML (path, or name under ``configs/transfer/``).
        opts: ``KEY VALUE`` overrides, merged last; a ``SOLVER.IMS_PER_BATCH`` among them
            without ``SOLVER.BASE_LR`` scales the recipe's lr linearly (unless
            ``SOLVER.SCALE_LR_WITH_BATCH False``, which is taken out of the opts).
    Returns:
        a detectron2 config (not frozen) with only detectron2's own keys.
    """
    path = resolve_transfer_config(name)
    ours = CfgNode.load_yaml_with_base(path, allow_unsafe=False)
    base = ours.pop(MODEL_ZOO_BASE_KEY, None)
    cfg = get_cfg()
    if base:
        # RetinaNet's baseline builds its anchor sizes with a python tag, so model-zoo files
        # (shipped with detectron2, trusted) load unsafely, without the warning; ours stay safe.
        with quiet_logger("fvcore.common.config"):
            cfg.merge_from_file(model_zoo.get_config_file(base), allow_unsafe=True)
    cfg.merge_from_other_cfg(CfgNode(ours))
    # A command-line IMS_PER_BATCH without BASE_LR scales the recipe's lr linearly.
    lr_note = merge_opts_scaling_lr(cfg, opts)
    if lr_note:
        logging.getLogger(__name__).info(lr_note)
    return cfg


@contextlib.contextmanager
def quiet_logger(logger_name: str):
    """Only errors from ``logger_name`` inside the block (for messages we know are noise)."""
    lg = logging.getLogger(logger_name)
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)
