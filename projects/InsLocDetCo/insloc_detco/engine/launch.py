"""detectron2's ``launch`` with an orderly shutdown of the process group."""
import logging
import os
import sys
from datetime import timedelta

import torch.distributed as dist
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm

__all__ = ["launch"]


def launch(main_func, num_gpus_per_machine: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url=None, args=(), timeout: timedelta = DEFAULT_TIMEOUT):  # fmt: skip
    """Same arguments as :func:`detectron2.engine.launch`. When it starts several processes,
    each one destroys its process groups after ``main_func`` returns: detectron2 leaves them
    alive, and with torch 2.14 + gloo about one two-process run in four then aborts at
    interpreter exit ("terminate called without an active exception", SIGABRT) although
    ``main_func`` succeeded; each worker then exits with ``os._exit(0)`` (see below)."""
    # detectron2 spawns workers exactly when the world has more than one process; otherwise it
    # calls main_func in the caller's process, which must be left as it is (it may even hold a
    # process group of its own).
    spawns = num_gpus_per_machine * num_machines > 1
    d2_launch(_run_then_shut_down, num_gpus_per_machine, num_machines, machine_rank, dist_url,
              args=(main_func, spawns, *args), timeout=timeout)  # fmt: skip


def _run_then_shut_down(main_func, spawned: bool, *args):
    result = main_func(*args)
    if not spawned:
        return result
    comm.synchronize()  # no rank tears down while a peer still talks to it
    dist.destroy_process_group()  # all groups, detectron2's local group included
    # A spawned worker whose work is done and flushed leaves without interpreter finalisation:
    # even after the teardown above, process 0 still aborted at exit once in a CI run of ~390
    # tests (2026-11-23, test_ranks_draw_different_parameters): a C++ thread still joinable
    # when finalisation destroys it.
    # Its return value is discarded by torch's spawn anyway; its exit code 0 is what counts.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
