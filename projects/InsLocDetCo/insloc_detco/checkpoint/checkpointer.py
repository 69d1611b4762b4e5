"""detectron2's ``DetectionCheckpointer`` reading weights files with :func:`load_weights_file`."""
from detectron2.checkpoint import DetectionCheckpointer

from .safe_load import load_weights_file

__all__ = ["SafeDetectionCheckpointer"]


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """
    A ``DetectionCheckpointer`` that never runs code from a file it loads (``MODEL.WEIGHTS``,
    ``--resume``): detectron2 unpickles ``.pkl`` files with plain ``pickle.load``. The formats
    and their interpretation stay detectron2's; only the unpickling is restricted.
    """

    def _load_file(self, filename: str):
        if filename.endswith(".pkl"):
            return _model_zoo_format(load_weights_file(filename))
        return super()._load_file(filename)

    def _torch_load(self, f):
        return load_weights_file(f) if isinstance(f, str) else super()._torch_load(f)


def _model_zoo_format(data) -> dict:
    """
    The checkpoint dict detectron2 makes of an unpickled ``.pkl``: a detectron2 model-zoo file
    (``model`` + ``__author__``) as it is; a Caffe2 / Detectron model-zoo dict (its ``blobs``)
    as weights to match by name, without the solver's ``*_momentum`` blobs.
    """
    if not isinstance(data, dict):
        raise ValueError(f"A .pkl weights file must hold a dict, not {type(data).__name__}.")
    if "model" in data and "__author__" in data:
        return data
    blobs = data.get("blobs", data)
    model = {k: v for k, v in blobs.items() if not k.endswith("_momentum")}
    return {"model": model, "__author__": "Caffe2", "matching_heuristics": True}
