"""How many CPU threads each training process may use.

PyTorch gives every process one intra-op thread per physical core. With several training
processes per machine, each with its loader workers, that oversubscribes the cores and starves
the GPU (docs/SPEED.md, "Thread discipline"). ``torchrun`` sets one thread per process for this
reason; detectron2's ``launch`` sets nothing. :func:`configure_threads` does it
for every launch path (one process, ``--num-gpus N``, several machines): it runs in each
training process, after ``launch`` has set up the local process group.
"""

import logging
import os

import torch
from detectron2.utils import comm

__all__ = ["configure_threads", "main_process_threads"]

logger = logging.getLogger(__name__)

# PyTorch's own choice for this process (physical cores, or OMP_NUM_THREADS), before we change it.
_TORCH_DEFAULT_THREADS = torch.get_num_threads()


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def main_process_threads(
    *, cores: int, local_processes: int, workers_per_process: int, on_cuda: bool
) -> int:
    """
    The automatic intra-op thread count of one training process.

    On CUDA the process mostly launches kernels while its loader workers decode and crop, so it
    gets the cores its share leaves after its workers (at least one). On the CPU the training
    process does the arithmetic itself and gets its share of the cores, at most PyTorch's
    default (so one CPU process keeps exactly PyTorch's choice; the loader workers mostly wait
    on a full prefetch queue).
    """
    share = max(1, cores // max(1, local_processes))
    if on_cuda:
        return max(1, share - workers_per_process)
    return min(share, _TORCH_DEFAULT_THREADS)  # never more than PyTorch's default


def configure_threads(cfg) -> int:
    """
    Set ``torch.set_num_threads`` for this training process and log the decision.

    Precedence: ``DATALOADER.MAIN_PROCESS_THREADS`` > 0, then the user's ``OMP_NUM_THREADS``,
    then :func:`main_process_threads`.

    Returns:
        the number of intra-op threads now in use.
    """
    cores = _available_cores()
    local = comm.get_local_size() if comm.get_world_size() > 1 else 1
    workers = cfg.DATALOADER.NUM_WORKERS
    configured = cfg.DATALOADER.get("MAIN_PROCESS_THREADS", 0)
    if configured > 0:
        threads, why = configured, "DATALOADER.MAIN_PROCESS_THREADS"
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads, why = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    else:
        on_cuda = cfg.MODEL.DEVICE.startswith("cuda")
        threads = main_process_threads(
            cores=cores, local_processes=local, workers_per_process=workers, on_cuda=on_cuda
        )
        why = f"auto: {cores} cores / {local} local process(es)" + (
            f" - {workers} loader workers each" if on_cuda else ""
        )
    torch.set_num_threads(threads)
    logger.info(
        f"CPU threads: {threads} intra-op thread(s) per training process ({why}); "
        f"{workers} loader worker(s) per process with 1 thread each."
    )
    return threads
