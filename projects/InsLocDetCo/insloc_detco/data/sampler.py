"""A data stream that a resumed run continues exactly where the interrupted one was.

detectron2's ``TrainingSampler`` restarts its shuffled sequence from the beginning in every new
process, and each loader worker draws its augmentations from one random stream seeded when the
worker starts: after a resume both the images and their augmentations differ from those the
uninterrupted run would have seen. Here both are functions of the position in the stream:

* :class:`ResumableTrainingSampler`: epoch ``e`` is a permutation drawn from ``(seed, e)``, so
  the stream can start at any iteration without replaying the earlier ones; it yields
  ``(seed, position, index)``;
* :class:`SeededMapDataset`: seeds torch, numpy and ``random`` from ``(seed, position)``
  before mapping the record, in whichever loader worker maps it.

With detectron2's batching (a worker maps whole per-rank batches, ``shard_chunk_size``), batch
``i`` of a rank holds the same images with the same augmentations whatever the number of loader
workers and wherever the stream started. Positions are global (all ranks' samples are one
stream, rank ``r`` taking every ``world_size``-th), as in detectron2.
"""

import itertools
import os
import random
import signal
import threading
from typing import Iterator, Tuple

import numpy as np
import torch
from detectron2.utils import comm
from torch.utils.data import Dataset, Sampler, get_worker_info

__all__ = ["derive_seed", "seed_all", "ResumableTrainingSampler", "SeededMapDataset"]

_TAG_ORDER, _TAG_SAMPLE = 1, 2  # keep the epochs' orders and the samples' seeds apart
# insloc_detco.engine.preemption's signals: SLURM and torchrun send them to every process of a
# task, loader workers included, which must not die before the trainer has saved.
_PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every key (numpy's SeedSequence mixing)."""
    state = np.random.SeedSequence([int(k) % 2**63 for k in keys]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def seed_all(seed: int):
    """Seed torch (CPU and CUDA), numpy and ``random`` of this process."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class ResumableTrainingSampler(Sampler):
    """
    An infinite shuffled stream of ``(seed, position, index)`` for this rank that can start at
    any iteration (:meth:`set_start`), same order as if it had run from iteration 0.
    """

    def __init__(self, size: int, batch_size_per_rank: int, seed: int, shuffle: bool = True):
        self._size = size
        self._batch = batch_size_per_rank
        self._seed = seed
        self._shuffle = shuffle
        self._start_iter = 0
        self._rank, self._world = comm.get_rank(), comm.get_world_size()

    @property
    def seed(self) -> int:
        return self._seed

    def set_start(self, seed: int, start_iter: int):
        """The run's seed and the first iteration to load (before the loader is iterated)."""
        self._seed, self._start_iter = seed, start_iter

    def __iter__(self) -> Iterator[Tuple[int, int, int]]:
        first = self._start_iter * self._batch * self._world + self._rank
        for position in itertools.count(first, self._world):
            yield self._seed, position, self._index(position)

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self._size)
        if not self._shuffle:
            return offset
        if getattr(self, "_epoch", None) != epoch:
            g = torch.Generator().manual_seed(derive_seed(self._seed, _TAG_ORDER, epoch))
            self._order, self._epoch = torch.randperm(self._size, generator=g).tolist(), epoch
        return self._order[offset]


def _leave_preemption_signals_to_the_trainer():
    """In a loader worker: the preemption signals are taken by a thread instead of killing the
    process; one from the trainer (which ends its workers with SIGTERM) ends the worker."""
    trainer = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, _PREEMPTION_SIGNALS)

    def wait():
        while True:
            if signal.sigwaitinfo(_PREEMPTION_SIGNALS).si_pid == trainer:
                os._exit(0)

    threading.Thread(target=wait, name="preemption-signals", daemon=True).start()


class SeededMapDataset(Dataset):
    """``mapper(records[index])`` for a ``(seed, position, index)`` item, with all random
    generators of the process seeded from ``(seed, position)`` first. A loader worker ignores
    the preemption signals unless its trainer sends them (torch's workers die on a SIGTERM
    from anyone but their parent): the trainer saves first, and its workers end with it."""

    def __init__(self, records, mapper):
        self._records = records
        self._mapper = mapper
        self._pid = os.getpid()

    def __len__(self):
        return len(self._records)

    def __getitem__(self, item: Tuple[int, int, int]):
        seed, position, index = item
        if self._pid != os.getpid():  # the first item in a newly started loader worker
            self._pid = os.getpid()
            if get_worker_info() is not None:
                _leave_preemption_signals_to_the_trainer()
        seed_all(derive_seed(seed, _TAG_SAMPLE, position))
        out = self._mapper(self._records[index])
        while out is None:  # a mapper without its own replacement of unreadable images
            index = int(torch.randint(len(self._records), ()))
            out = self._mapper(self._records[index])
        return out
