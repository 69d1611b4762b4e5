"""
Frozen features on disk, one shard per process, so that no process holds a data set's features.

Each process (``detectron2.engine.launch``) extracts its records ``rank, rank + world, ...``
(:func:`.features.extract_shard`) and appends every batch to one ``.npy`` file per feature
(``<run folder>/<split>.rank<r>.<feature>.npy``, float32 or float16), then reads it back
memory-mapped: the classifiers and the kNN read rows and blocks of rows from the page cache or
the disk, never the whole array. A process's shard stays with it (no gather), so a node's local
scratch disk is enough. The run folder is removed when the readout ends (``keep``: left for
inspection).

Memory: a process holds one batch of features while writing and one block of
:data:`READ_BLOCK_BYTES` (or one minibatch) while reading, plus 8 bytes per record of its
shard (the record indices). The memory-mapped pages that are read count in the resident size
of the process as file cache: clean pages the kernel shares and reclaims.
"""

import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Tuple

import numpy as np
import torch
from detectron2.utils import comm

from .encoder import ReadoutError

__all__ = [
    "READ_BLOCK_BYTES",
    "FeatureShard",
    "FeatureStore",
    "rows_per_block",
    "row_blocks",
    "global_sum",
]

logger = logging.getLogger(__name__)

# Rows of a memory-mapped feature file read at a time by block-wise passes (statistics,
# evaluation, kNN bank blocks): this many bytes of features.
READ_BLOCK_BYTES = 64 << 20
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def rows_per_block(bytes_per_row: int) -> int:
    """Rows of ``bytes_per_row`` in a block of :data:`READ_BLOCK_BYTES` (read at call time)."""
    return max(1, READ_BLOCK_BYTES // max(1, bytes_per_row))


def row_blocks(x) -> Iterator[Tuple[int, torch.Tensor]]:
    """
    Args:
        x: (R, D) features, a tensor or a (memory-mapped) array.
    Yields:
        (first row, (r, D) float32 tensor) blocks of consecutive rows.
    """
    rows = rows_per_block(x.shape[1] * 4)
    for start in range(0, x.shape[0], rows):
        block = x[start : start + rows]
        if isinstance(block, np.ndarray):
            block = torch.from_numpy(np.array(block))
        yield start, block.float()


def global_sum(values: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Element-wise sums of small per-process arrays over all processes (every process)."""
    if comm.get_world_size() == 1:
        return values
    parts = comm.all_gather(values)
    return {k: sum(p[k] for p in parts) for k in values}


@dataclass
class FeatureShard:
    """
    This process's features of one split.

    Attributes:
        index: (n,) record indices of the shard, in row order.
        arrays: {feature: (n * rows[feature], D) read-only memory-mapped array}; feature
            "boxes" has M rows per record, record-major.
        rows: rows per record of every feature.
        files: the files behind ``arrays``.
    """

    index: np.ndarray
    arrays: Dict[str, np.ndarray] = field(default_factory=dict)
    rows: Dict[str, int] = field(default_factory=dict)
    files: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.index)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


class FeatureStore:
    """
    A run folder under ``root`` for the feature shards of one readout (every process the same
    folder; ``with FeatureStore(...) as store``: created on entry, removed on exit).
    """

    def __init__(self, root: str, dtype: str = "float32", keep: bool = False):
        """
        Args:
            root: where run folders are made (e.g. ``<output dir>/features``; a large local disk).
            dtype: "float32" or "float16" (half the disk; features beyond 65504 are refused).
            keep: leave the files when done.
        """
        if dtype not in ("float32", "float16"):
            raise ReadoutError(f"feature dtype must be float32 or float16, got '{dtype}'.")
        self.root, self.dtype, self.keep = root, np.dtype(dtype), keep
        self.folder = ""
        self._files: List[str] = []

    def __enter__(self) -> "FeatureStore":
        name = comm.all_gather(uuid.uuid4().hex[:12])[0]  # the main process's name for all
        self.folder = os.path.join(self.root, f"run_{name}")
        os.makedirs(self.folder, exist_ok=True)
        return self

    def __exit__(self, *exc):
        if self.keep:
            logger.info(f"Features kept in {self.folder}")
            return
        for f in self._files:
            if os.path.exists(f):
                os.remove(f)
        if exc[0] is None:  # after an error the other processes may never get here
            comm.synchronize()
        for d in (self.folder, self.root):
            try:
                os.rmdir(d)  # only if empty: other runs' folders stay
            except OSError:
                pass

    def write(
        self, name: str, batches: Iterable[Tuple[torch.Tensor, Dict[str, torch.Tensor]]], n: int
    ) -> FeatureShard:
        """
        Append ``batches`` of (record indices (b,), {feature: (b * rows, D)}) to this process's
        files of split ``name``; every process calls it (the feature shapes are shared with
        processes whose shard is empty).

        Args:
            n: records of this process's shard (the batches' total).
        """
        shard, handles = FeatureShard(index=np.empty(n, dtype=np.int64)), {}
        done = 0
        try:
            for index, feats in batches:
                if not handles:
                    handles = self._open(name, shard, feats, len(index), n)
                for k, v in feats.items():
                    self._cast(k, v).tofile(handles[k])
                shard.index[done : done + len(index)] = index.numpy()
                done += len(index)
        finally:
            for h in handles.values():
                h.close()
        if done != n:
            raise ReadoutError(f"[{name}] {done} of {n} records were extracted.")
        return self._reopen(name, shard)

    def _open(self, name, shard, feats, batch, n):
        shapes = {k: (v.shape[0] // batch, v.shape[1]) for k, v in feats.items()}
        need = sum(n * r * d for r, d in shapes.values()) * self.dtype.itemsize
        free = shutil.disk_usage(self.folder).free
        local = comm.get_local_size()
        if need * local > free:
            raise ReadoutError(
                f"The features of '{name}' need {need * local / 2**30:.1f} GiB on {self.folder} "
                f"({local} processes), {free / 2**30:.1f} GiB are free: pass --feature-dir on a "
                "larger disk, or --feature-dtype float16 (half the size)."
            )
        handles = {}
        for k, (rows, dim) in shapes.items():
            path = os.path.join(self.folder, f"{name}.rank{comm.get_rank()}.{k}.npy")
            handles[k] = open(path, "wb")
            header = {
                "descr": np.lib.format.dtype_to_descr(self.dtype),
                "fortran_order": False,
                "shape": (n * rows, dim),
            }
            np.lib.format.write_array_header_1_0(handles[k], header)
            shard.rows[k] = rows
            shard.files.append(path)
            self._files.append(path)
        return handles

    def _cast(self, key: str, v: torch.Tensor) -> np.ndarray:
        v = v.detach().float().cpu().numpy()
        if self.dtype == np.float16 and v.size and np.abs(v).max() > _FLOAT16_MAX:
            raise ReadoutError(
                f"'{key}' features reach {np.abs(v).max():.3g}, beyond float16's range: use "
                "--feature-dtype float32."
            )
        return np.ascontiguousarray(v.astype(self.dtype, copy=False))

    def _reopen(self, name: str, shard: FeatureShard) -> FeatureShard:
        for k, path in zip(shard.rows, shard.files):
            shard.arrays[k] = np.load(path, mmap_mode="r")
        # Processes with an empty shard learn the shapes from the others.
        shapes = {k: (shard.rows[k], a.shape[1]) for k, a in shard.arrays.items()}
        for other in comm.all_gather(shapes):
            for k, (rows, dim) in other.items():
                if k not in shard.arrays:
                    shard.rows[k] = rows
                    shard.arrays[k] = np.empty((0, dim), dtype=self.dtype)
        total = sum(comm.all_gather(shard.nbytes()))
        logger.info(f"[{name}] features on disk: {total / 2**30:.2f} GiB in {self.folder}")
        return shard
