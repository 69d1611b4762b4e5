"""Read a weights file without running code from it.

Weights files are shared on the internet, and both formats we read are pickles, which can call
any Python function while loading. :func:`load_weights_file` accepts only what weights files
hold: containers, strings, numbers, numpy arrays (model-zoo ``.pkl``) and tensors (``torch.save``
files, through ``torch.load(weights_only=True)``). Anything else is refused before it runs.
"""

import pickle
import zipfile
from typing import Any

import torch
from detectron2.utils.file_io import PathManager

from .integrity import verify_checksum

__all__ = ["UnsafeWeightsError", "load_weights_file", "SAFE_PICKLE_GLOBALS"]

# The only callables a model-zoo pickle may name: how numpy arrays, numpy scalars, dtypes and
# OrderedDicts are rebuilt (numpy 1 and 2 module paths, pickle protocols 2-5), and how
# protocol-2 pickles store bytes. None of them executes anything beyond building that value.
SAFE_PICKLE_GLOBALS = frozenset(
    [
        ("collections", "OrderedDict"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    ]
)

# torch.save's legacy (non-zip) format starts with this pickled integer.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class UnsafeWeightsError(pickle.UnpicklingError):
    """The file asks to run code (or to build objects) that a weights file never needs."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in SAFE_PICKLE_GLOBALS or module.startswith("numpy.dtypes"):
            return super().find_class(module, name)
        raise UnsafeWeightsError(
            f"it references '{module}.{name}', which a weights file never needs (only dicts, "
            "lists, strings, numbers and numpy arrays are accepted in a .pkl)"
        )

    def persistent_load(self, pid):
        raise UnsafeWeightsError(
            "it holds tensors pickled outside torch.save; save them with torch.save or as numpy"
        )


def load_weights_file(path: str) -> Any:
    """
    Args:
        path: a ``.pkl`` (detectron2 / Detectron model zoo: pickled dict of numpy arrays) or a
            ``torch.save`` file (``.pth``, ``.pth.tar``, ``.pt``...), any PathManager URI. If a
            ``<path>.sha256`` lies beside it (our checkpoints), the file is verified first.
    Returns:
        the unpickled object (dicts of numpy arrays or tensors, numbers, strings).
    Raises:
        UnsafeWeightsError: the file names a callable or class outside the allow-list; nothing
            of it was executed.
        CorruptCheckpointError: the file differs from the one whose checksum was recorded.
        pickle.UnpicklingError, EOFError, RuntimeError...: the file is corrupt.
    """
    verify_checksum(path)
    with PathManager.open(path, "rb") as f:
        if zipfile.is_zipfile(f):  # torch.save's default format
            f.seek(0)
            return _torch_load(path, f)
        f.seek(0)
        try:
            obj = _RestrictedUnpickler(f, encoding="latin1").load()
        except UnsafeWeightsError as e:
            raise UnsafeWeightsError(f"Refusing to load '{path}': {e}.") from None
        if isinstance(obj, int) and obj == _TORCH_LEGACY_MAGIC:
            f.seek(0)
            return _torch_load(path, f)
        return obj


def _torch_load(path: str, f) -> Any:
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise  # a corrupt file, not a refused one
        # torch's weights-only unpickler names the offending global in its message.
        reason = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "")
        raise UnsafeWeightsError(
            f"Refusing to load '{path}': it holds objects other than tensors and plain data"
            + (f" ({reason})" if reason else "")
            + "."
        ) from None
