"""detectron2's ``DetectionCheckpointer``, safe to read and robust to damaged files.

* Reading never runs code (:func:`load_weights_file`: detectron2 unpickles ``.pkl`` files with
  plain ``pickle.load``), and a file with a ``.sha256`` beside it is verified first.
* Writing is atomic and records a checksum (:func:`save_checkpoint_file`); ``last_checkpoint``
  is replaced atomically, after the file it names is complete, so it never names a partial file.
* ``resume_or_load(resume=True)`` resumes from the newest checkpoint that reads correctly: the
  one ``last_checkpoint`` names, or else, with a warning naming what was wrong, the other
  checkpoints of the folder, newest first. Damaged files are reported and left in place.
"""

import logging
import os
import re
import shutil
from typing import List, Optional

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm

from .integrity import (
    CorruptCheckpointError,
    DiskFullError,
    checksum_path,
    is_temporary_file,
    save_checkpoint_file,
    write_text_atomic,
)
from .safe_load import UnsafeWeightsError, load_weights_file

__all__ = ["SafeDetectionCheckpointer"]

logger = logging.getLogger(__name__)


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """
    A ``DetectionCheckpointer`` (same formats, same interpretation of model-zoo files) that
    never runs code from a file it loads (``MODEL.WEIGHTS``, ``--resume``), writes checkpoints
    atomically with a SHA-256, verifies it on load, and resumes from the newest readable
    checkpoint when the last one is damaged or missing.
    """

    def __init__(self, model, save_dir: str = "", *, file_prefix: str = "model", **kwargs):
        """
        Args:
            file_prefix: checkpoints of a run are ``<file_prefix>_*.pth`` in ``save_dir`` (as
                written by ``PeriodicCheckpointer``); they are the candidates of a resume.
            model, save_dir, kwargs: as ``DetectionCheckpointer``.
        """
        super().__init__(model, save_dir, **kwargs)
        self.file_prefix = file_prefix
        self._preloaded = None  # (path, data): the file read while choosing what to resume

    # ------------------------------------------------------------------------------------
    # Writing
    # ------------------------------------------------------------------------------------
    def save(self, name: str, **kwargs):
        """
        As ``Checkpointer.save``, written atomically with ``<name>.pth.sha256``.

        Raises:
            DiskFullError: with one line that says which checkpoint is intact and how much
                space this one needs; no partial file is left, ``last_checkpoint`` unchanged.
        """
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {path}")
        intact, written = self._last_checkpoint_target(), False
        try:
            save_checkpoint_file(data, path)
            written = True
            self.tag_last_checkpoint(basename)
        except DiskFullError as e:
            message = self._disk_full_message(e, path, data, intact, written)
            raise DiskFullError(e.errno, message) from e

    def _disk_full_message(self, error, path: str, data, intact: Optional[str], written: bool):
        try:
            free = f"{_mb(shutil.disk_usage(self.save_dir).free)} free"
        except OSError:
            free = "free space unknown"
        what = (
            f"{path} was written but last_checkpoint still names "
            if written
            else f"nothing of {os.path.basename(path)} was kept; the last complete checkpoint is "
        )
        return (
            f"{error.strerror} while saving a checkpoint: {what}"
            f"{intact or '(none: no checkpoint yet)'}. A checkpoint needs ~{_mb(_nbytes(data))} "
            f"({self.save_dir}: {free}). Free space or lower SOLVER.CHECKPOINT_MAX_TO_KEEP, then "
            "run the same command again to resume."
        )

    def tag_last_checkpoint(self, last_filename_basename: str):
        write_text_atomic(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    def remove_checkpoint(self, path: str):
        """Delete a checkpoint and its checksum."""
        for p in (path, checksum_path(path)):
            if self.path_manager.exists(p):
                self.path_manager.rm(p)

    # ------------------------------------------------------------------------------------
    # Reading
    # ------------------------------------------------------------------------------------
    def _load_file(self, filename: str):
        try:
            if filename.endswith(".pkl"):
                return _model_zoo_format(load_weights_file(filename))
            return super()._load_file(filename)  # .pth: through _torch_load below
        except (UnsafeWeightsError, CorruptCheckpointError):
            raise
        except Exception as e:
            raise CorruptCheckpointError(
                f"Cannot read checkpoint '{filename}': {_read_error(filename, e)}."
            ) from e

    def _torch_load(self, f):
        if self._preloaded is not None and self._preloaded[0] == f:
            data, self._preloaded = self._preloaded[1], None
            return data
        return load_weights_file(f) if isinstance(f, str) else super()._torch_load(f)

    def checkpoint_files(self) -> List[str]:
        """The checkpoints of this folder (``<file_prefix>_*.pth``), newest first."""
        if not self.save_dir or not self.path_manager.isdir(self.save_dir):
            return []
        pattern = re.compile(rf"^{re.escape(self.file_prefix)}_.*\.pth$")
        files = [
            os.path.join(self.save_dir, name)
            for name in self.path_manager.ls(self.save_dir)
            if pattern.match(name) and not is_temporary_file(name)
        ]
        return sorted(files, key=_newest_first_key, reverse=True)

    def has_checkpoint(self) -> bool:
        """Whether there is anything to resume: ``last_checkpoint`` or a checkpoint file."""
        return super().has_checkpoint() or bool(self.checkpoint_files())

    def resume_or_load(self, path: str, *, resume: bool = True):
        """
        As detectron2's, except that ``resume`` takes the newest checkpoint that reads correctly
        (see :meth:`choose_resume_file`).
        """
        if resume and self.has_checkpoint():
            return self.load(self.choose_resume_file())
        return self.load(path, checkpointables=[])

    def choose_resume_file(self) -> str:
        """
        The file to resume from: the one ``last_checkpoint`` names if it is complete and
        readable, else the newest readable checkpoint of the folder, with a warning for each
        file passed over. Every rank must call it (the ranks agree on the file).

        Raises:
            CorruptCheckpointError: no checkpoint of the folder can be read.
        """
        named = self._last_checkpoint_target()
        candidates = ([named] if named else []) + [f for f in self.checkpoint_files() if f != named]
        rejected = []
        for candidate in candidates:
            problem = _problem_on_any_rank(self._try_read(candidate))
            if problem is None:
                break
            rejected.append((candidate, problem))
            logger.warning(f"Cannot resume from {candidate}: {problem}.")
        else:
            self._preloaded = None
            listing = "\n".join(f"  {c}: {why}" for c, why in rejected)
            raise CorruptCheckpointError(
                f"--resume found no readable checkpoint in {self.save_dir}:\n{listing}\n"
                "Restore a checkpoint there, or start over without --resume (or with another "
                "OUTPUT_DIR)."
            )
        if rejected:
            passed_over = "; ".join(f"{os.path.basename(c)} ({why})" for c, why in rejected)
            logger.warning(
                f"RESUMING FROM AN OLDER CHECKPOINT, {candidate}: the newer {passed_over} could "
                "not be used. The iterations after it are trained again; the damaged files are "
                "left untouched."
            )
        elif named is None:
            logger.warning(f"{self.save_dir} has no last_checkpoint: resuming from {candidate}.")
        return candidate

    def _last_checkpoint_target(self) -> Optional[str]:
        name_file = os.path.join(self.save_dir, "last_checkpoint")
        if not self.path_manager.exists(name_file):
            return None
        with self.path_manager.open(name_file, "r") as f:
            name = f.read().strip()
        if not name:
            logger.warning(f"{name_file} is empty.")
            return None
        return os.path.join(self.save_dir, name)

    def _try_read(self, path: str) -> Optional[str]:
        """Read (and verify) ``path``, keeping its content for the load that follows.
        Returns what is wrong with it, or None."""
        self._preloaded = None
        if not self.path_manager.isfile(path):
            return "the file does not exist"
        try:
            data = load_weights_file(path)
        except UnsafeWeightsError:
            raise  # someone placed a hostile file among the checkpoints: stop, do not skip it
        except CorruptCheckpointError as e:
            return str(e)
        except Exception as e:
            return _read_error(path, e)
        if not isinstance(data, dict) or "model" not in data:
            return "it holds no 'model' state dict, so it is not a training checkpoint"
        self._preloaded = (path, data)
        return None


def _problem_on_any_rank(problem: Optional[str]) -> Optional[str]:
    """All ranks must resume from the same file: a file unreadable on one rank is skipped by all."""
    if comm.get_world_size() == 1:
        return problem
    for rank, p in enumerate(comm.all_gather(problem)):
        if p is not None:
            return p if rank == comm.get_rank() else f"unreadable on rank {rank}: {p}"
    return None


def _nbytes(obj) -> int:
    """Bytes of the tensors in a (nested) checkpoint dict: about its size on disk."""
    if hasattr(obj, "element_size") and hasattr(obj, "numel"):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _mb(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def _newest_first_key(path: str):
    """Modification time, then the iteration in the name (``_final`` last)."""
    try:
        mtime = os.path.getmtime(path)
    except OSError:  # not a local file
        mtime = 0.0
    match = re.search(r"_(\d+)\.pth$", path)
    iteration = int(match.group(1)) if match else float("inf")
    return mtime, iteration


def _read_error(path: str, e: Exception) -> str:
    try:
        size = os.path.getsize(path)
    except OSError:
        size = None
    if size == 0:
        return "the file is empty (0 bytes)"
    what = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return f"unreadable, truncated or not a checkpoint ({size} bytes; {what})"


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
