"""
Reading and writing converted weights as detectron2 model-zoo ``.pkl`` files, without ever
destroying a file: the input checkpoint and any file that is not an earlier conversion of ours
are only replaced with ``force``; writes go to a temporary file in the same folder that is
renamed over the output at the end, and removed on any failure.
"""

import logging
import os
import pickle
import tempfile
from collections import OrderedDict
from typing import Dict, Optional

import numpy as np
import torch

from ..checkpoint import UnsafeWeightsError, load_weights_file
from .transferable import ConversionError

__all__ = ["AUTHOR", "check_output_path", "save_model_zoo_pkl", "load_model_zoo_pkl"]

logger = logging.getLogger(__name__)

AUTHOR = "InsLocDetCo"


def check_output_path(path: str, source: Optional[str] = None, force: bool = False):
    """
    Refuse an output that cannot or must not be written, before any work is done.

    Args:
        path: the ``.pkl`` to write.
        source: the input checkpoint (never replaced without ``force``).
        force: replace an existing file that is not an earlier conversion of ours.
    Raises:
        ConversionError: a one-line reason.
    """
    if os.path.isdir(path):
        raise ConversionError(f"Output '{path}' is a directory: give a file name (e.g. model.pkl).")
    parent = os.path.dirname(os.path.abspath(path))
    existing = next((p for p in _ancestors(parent) if os.path.exists(p)), None)
    if existing is not None and not os.path.isdir(existing):
        raise ConversionError(f"Cannot write '{path}': '{existing}' is a file, not a folder.")
    if not os.path.lexists(path) or force:
        return
    if source and os.path.exists(source) and os.path.samefile(path, source):
        raise ConversionError(
            f"Output '{path}' is the input checkpoint: writing would replace it. Choose another "
            "output name (or pass --force to replace it)."
        )
    if not _is_conversion(path):
        raise ConversionError(
            f"Output '{path}' exists and is not a conversion written by {AUTHOR}: not "
            "replacing it. Choose another name, or pass --force."
        )


def _ancestors(folder: str):
    while True:
        yield folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent


def _is_conversion(path: str) -> bool:
    """An earlier output of :func:`save_model_zoo_pkl` (safe to replace)."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        head = f.read(4096)
    # Not a pickle (a torch zip file...), or a legacy torch.save file (its first object is a
    # 10-byte integer, opcode LONG1): not ours, and not worth reading in full.
    if not head.startswith(b"\x80") or head[2:3] == b"\x8a":
        return False
    if b"__author__" in head:  # we write it first
        return AUTHOR.encode() in head
    try:
        data = load_weights_file(path)
    except Exception:
        return False
    return isinstance(data, dict) and data.get("__author__") == AUTHOR


def save_model_zoo_pkl(
    conversion, path: str, source: Optional[str] = None, force: bool = False, **extra
):
    """
    Write ``{"model", "__author__", "matching_heuristics": True, ...}`` like detectron2's
    model zoo: numpy arrays, readable without torch.

    Args:
        conversion: a :class:`.converter.Conversion`.
        path: the ``.pkl`` to write (its folder is created).
        source: the input checkpoint, stored in the file; never replaced without ``force``.
        force: replace an existing file that is not an earlier conversion of ours.
        extra: stored too (e.g. ``iteration``); ``DetectionCheckpointer`` ignores them.
    Raises:
        ConversionError: see :func:`check_output_path`, or the write failed (nothing is left
            behind, an earlier file at ``path`` is intact).
    """
    check_output_path(path, source, force)
    data = {
        "__author__": AUTHOR,  # first: an existing file is recognised from its first bytes
        "model": OrderedDict((k, v.detach().cpu().numpy()) for k, v in conversion.model.items()),
        "matching_heuristics": True,
        "meta_architecture": conversion.meta_architecture,
        "source_format": conversion.source_format,
        "target": conversion.target,
        "source": source,
        **extra,
    }
    parent = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=os.path.basename(path) + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)  # never a half-written file that looks converted
        tmp = None
    except OSError as e:
        raise ConversionError(f"Cannot write '{path}': {e.strerror or e}.") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def load_model_zoo_pkl(path: str) -> Dict:
    """Read a model-zoo ``.pkl``; raises ConversionError if it is not one."""
    try:
        data = load_weights_file(path)
    except UnsafeWeightsError as e:
        raise ConversionError(str(e)) from None
    except Exception as e:
        raise ConversionError(f"Cannot read '{path}' as a pickle: {type(e).__name__}: {e}") from e
    if not (isinstance(data, dict) and "model" in data and "__author__" in data):
        raise ConversionError(
            f"'{path}' is not a detectron2 model-zoo file (no 'model' / '__author__')."
        )
    if not data["model"]:
        raise ConversionError(f"'{path}' holds no tensors.")
    if not all(isinstance(v, (np.ndarray, torch.Tensor)) for v in data["model"].values()):
        raise ConversionError(f"'{path}': 'model' does not map names to arrays.")
    return data
