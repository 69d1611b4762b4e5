"""Checkpoints written atomically, with a checksum that is verified whenever they are read.

``save_checkpoint_file`` writes ``torch.save`` output to a temporary file in the target folder,
computing its SHA-256 on the way (no second pass), flushes it to disk, writes the hash beside it
as ``<name>.sha256`` (``sha256sum`` format: ``sha256sum -c model_final.pth.sha256`` checks a
file by hand), and only then renames the temporary file to its name. A crash or a full disk
during a write therefore leaves the previous files as they were (at most a stale temporary file,
removed by the next save), and a file that changed after it was written (truncated, bytes
flipped, overwritten) fails :func:`verify_checksum` instead of loading wrong weights.

The hash sits beside the file rather than inside it because a hash of the whole file cannot be
stored in the file itself, and the whole file is what a truncated copy or a flipped bit damages
(torch's zip container stores CRCs but never checks them when loading). A file without a
``.sha256`` (copied alone, written by another program) loads unverified.

The hashing's cost per save and per load is measured in docs/SPEED.md ("Checkpoint checksums").
"""

import errno
import hashlib
import os
from typing import Any, Optional

import torch
from detectron2.utils.file_io import PathManager

__all__ = [
    "CHECKSUM_SUFFIX",
    "CorruptCheckpointError",
    "DiskFullError",
    "checksum_path",
    "file_sha256",
    "verify_checksum",
    "save_checkpoint_file",
    "write_text_atomic",
    "is_temporary_file",
]

CHECKSUM_SUFFIX = ".sha256"
_TMP_MARK = ".tmp-"  # <name>.tmp-<pid>: a write in progress (or abandoned by a crash)
_CHUNK = 16 << 20


class CorruptCheckpointError(RuntimeError):
    """A checkpoint that cannot be used: truncated, empty, damaged, or not what was saved."""


class DiskFullError(OSError):
    """A write failed for lack of space (or quota); nothing partial was left behind."""


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full_error(error: BaseException, writer=None) -> Optional[OSError]:
    """The OSError(ENOSPC / EDQUOT) behind ``error`` (torch's zip writer turns the one our
    file object raised into 'RuntimeError: ... unexpected pos ...'), or None."""
    seen = [getattr(writer, "error", None)]
    while error is not None and len(seen) < 10:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return next((e for e in seen if isinstance(e, OSError) and e.errno in _DISK_FULL), None)


def checksum_path(path: str) -> str:
    return path + CHECKSUM_SUFFIX


def is_temporary_file(name: str) -> bool:
    """Whether ``name`` is a temporary file of :func:`save_checkpoint_file` or
    :func:`write_text_atomic`."""
    return _TMP_MARK in os.path.basename(name)


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file, read in chunks (any PathManager path)."""
    h = hashlib.sha256()
    with PathManager.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checksum(path: str) -> Optional[bool]:
    """
    Compare ``path`` with the SHA-256 recorded in ``<path>.sha256`` when it was saved.

    Returns:
        True if it matches, None if there is no ``.sha256`` (nothing to verify) or ``path`` is
        not a local file (URLs are not probed for one).
    Raises:
        CorruptCheckpointError: the file is missing, or differs from what was saved.
    """
    sidecar = checksum_path(path)
    if not _is_local(path) or not PathManager.exists(sidecar):
        return None
    if not PathManager.isfile(path):
        raise CorruptCheckpointError(f"Checkpoint '{path}' does not exist (only its {sidecar}).")
    with PathManager.open(sidecar, "r") as f:
        fields = f.read().split()
    expected = fields[0].lower() if fields else ""
    if len(expected) != 64:
        raise CorruptCheckpointError(
            f"'{sidecar}' holds no SHA-256, so '{path}' cannot be verified; delete {sidecar} "
            "to load the file without verification."
        )
    actual = file_sha256(path)
    if actual != expected:
        size = _size(path)
        raise CorruptCheckpointError(
            f"Checkpoint '{path}' ({size} bytes) is not the file that was saved: its SHA-256 is "
            f"{actual[:12]}..., {sidecar} says {expected[:12]}... (truncated, damaged on disk, "
            f"or replaced). If you replaced it on purpose, delete {sidecar}."
        )
    return True


def save_checkpoint_file(obj: Any, path: str):
    """
    ``torch.save(obj, path)``, atomically, with ``<path>.sha256`` (local paths; any other
    PathManager path is written directly, without a checksum).

    Raises:
        DiskFullError: no space (or quota) left; the partial file was removed.
    """
    if not _is_local(path):
        with PathManager.open(path, "wb") as f:
            torch.save(obj, f)
        return
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = f"{path}{_TMP_MARK}{os.getpid()}"
    writer = None
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
        # The hash is in place before the file gets its name: a file under its final name always
        # has the .sha256 it was written with.
        write_text_atomic(checksum_path(path), f"{writer.hexdigest()}  {os.path.basename(path)}\n")
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        full = _disk_full_error(e, writer)
        if full is not None:
            raise DiskFullError(full.errno, f"{full.strerror} while writing {path}") from e
        raise
    _fsync_dir(folder)


def write_text_atomic(path: str, text: str):
    """Write a small text file so that readers see the old or the new content, never a part."""
    if not _is_local(path):
        with PathManager.open(path, "w") as f:
            f.write(text)
        return
    tmp = f"{path}{_TMP_MARK}{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        full = _disk_full_error(e)
        if full is not None:
            raise DiskFullError(full.errno, f"{full.strerror} while writing {path}") from e
        raise
    _fsync_dir(os.path.dirname(path) or ".")


class _HashingWriter:
    """A write-only file object that hashes what goes through it (torch.save only writes)."""

    def __init__(self, f):
        self._f = f
        self._hash = hashlib.sha256()
        self.error = None  # an OSError of the file, which torch's writer would replace by its own

    def write(self, data) -> int:
        self._hash.update(data)
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self._f.flush()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _remove_stale_temporaries(path: str):
    """Temporary files of earlier writes of ``path`` that a crash left behind."""
    folder, name = os.path.split(path)
    for other in os.listdir(folder or "."):
        if other.startswith(name + _TMP_MARK):
            os.remove(os.path.join(folder, other))


def _fsync_dir(folder: str):
    # Makes the rename durable; not possible on every platform (e.g. Windows), hence optional.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_local(path: str) -> bool:
    return "://" not in path


def _size(path: str) -> int:
    try:
        return os.path.getsize(PathManager.get_local_path(path))
    except OSError:
        return -1
