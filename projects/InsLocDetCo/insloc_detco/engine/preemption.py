"""Preemption and time limits: every rank stops at one iteration, which is saved first.

SLURM (at preemption, and ``--signal=USR1@<s>`` before the time limit), Kubernetes and spot
instances send SIGTERM or SIGUSR1; submitit uses SIGUSR2. During training
:class:`PreemptionHook` turns these signals into a request. The ranks combine their requests
at fixed iterations only, the multiples of ``agree_period`` (``SOLVER.LOG_PERIOD``): there an
all-reduce of one integer (the largest signal number) on a gloo group of its own, in host
memory, tells every rank the same answer at the same iteration. Those are the iterations where
the step trainer reads its losses back anyway (:class:`.step.DeviceMetricsTrainer`), so the
steps between them never wait for the device or for the other ranks. When the combined request
is set, rank 0 writes the checkpoint of that iteration (the device metrics flushed first, as
before every checkpoint; atomically, with its SHA-256), all ranks wait for it, and each process
exits with status 128 + signal (143 for SIGTERM, as if the signal had ended it: Kubernetes'
ExitCode restart policy retries it). The next start resumes from that checkpoint by itself, so
nothing is computed twice; the save comes at most ``agree_period`` iterations after the signal.
A one-process run stops at the iteration the signal came in.

Requeueing: under submitit the handler submitit installed (checkpoint-and-requeue, SIGUSR2) is
called after the checkpoint is written; under SLURM without submitit rank 0 runs ``scontrol
requeue`` on SIGUSR1 (the time-limit warning of ``--signal=USR1@<s>``; on preemption SLURM
requeues by itself).
"""

import logging
import os
import signal
import subprocess
import threading
from typing import Dict, Optional

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm

from .step import DeviceMetricsTrainer

__all__ = ["PREEMPTION_SIGNALS", "TrainingPreempted", "PreemptionHook", "preempted_exit_codes"]

logger = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def preempted_exit_codes():
    return {128 + int(s) for s in PREEMPTION_SIGNALS}


class TrainingPreempted(SystemExit):
    """Training stopped on a preemption signal after saving; ``code`` is 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(128 + int(signum))
        self.signum = int(signum)


class PreemptionHook(HookBase):
    """
    Saves and exits on a preemption signal (see the module docstring). Must come after the
    periodic checkpointer among the hooks: a signal agreed on at an iteration it has just saved
    is not saved twice.
    """

    def __init__(
        self,
        checkpointer,
        checkpoint_period: int,
        agree_period: int = 1,
        file_prefix: str = "model",
    ):
        """
        Args:
            checkpointer: writes the checkpoint (rank 0's saves; a no-op elsewhere).
            checkpoint_period: ``SOLVER.CHECKPOINT_PERIOD`` (those iterations are saved already).
            agree_period: with several ranks, the requests are combined after every iteration
                ``i`` with ``(i + 1) % agree_period == 0`` only (``SOLVER.LOG_PERIOD``).
        """
        self._checkpointer = checkpointer
        self._period = checkpoint_period
        self._agree_period = max(1, agree_period)
        self._prefix = file_prefix
        self._received: Optional[int] = None  # the first signal this process received
        self._previous: Dict[int, object] = {}
        self._group = None
        self._request = torch.zeros(1, dtype=torch.int64, device="cpu")  # the all-reduce's

    def before_train(self):
        self._received = None
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():  # signals reach it only
            for s in PREEMPTION_SIGNALS:
                self._previous[s] = signal.signal(s, self._on_signal)
        if comm.get_world_size() > 1:
            self._group = dist.new_group(backend="gloo")

    def _on_signal(self, signum, frame):
        if os.getpid() != self._pid:  # a process forked during training (an evaluator's pool)
            signal.signal(signum, signal.SIG_DFL)  # inherited this handler: end as it would have
            os.kill(os.getpid(), signum)
            return
        if self._received is None:
            self._received = signum
            logger.warning(
                f"{signal.Signals(signum).name} received at iteration {self.trainer.iter}: "
                "saving a checkpoint at the next iteration all ranks agree on, then exiting."
            )

    def after_step(self):
        it = self.trainer.iter
        if it >= self.trainer.max_iter - 1:
            return  # the last iteration: the run ends and saves model_final as usual
        signum = self._agreed_signal(it)
        if not signum:
            return
        _flush_device_metrics(self.trainer)  # a collective: every rank is at this iteration
        if self._period <= 0 or (it + 1) % self._period:  # else the checkpointer just saved it
            self._checkpointer.save(f"{self._prefix}_{it:07d}", iteration=it)
        if self._group is not None:
            dist.barrier(group=self._group)  # no rank leaves before the checkpoint is complete
        logger.warning(
            f"Stopped after iteration {it} on {signal.Signals(signum).name}; the next start "
            f"resumes from iteration {it + 1} ({self._checkpointer.save_dir})."
        )
        self._request_requeue(signum)
        raise TrainingPreempted(signum)

    def _agreed_signal(self, it: int) -> int:
        """
        The largest signal number any rank has received (0: none), after iteration ``it`` if
        it is one where the ranks agree, else 0. The request travels in host memory through
        gloo: nothing here reads a device tensor, and between agreement iterations nothing
        here runs at all.
        """
        if self._group is None:
            return self._received or 0
        if (it + 1) % self._agree_period:
            return 0
        self._request.fill_(self._received or 0)
        dist.all_reduce(self._request, op=dist.ReduceOp.MAX, group=self._group)
        return int(self._request.item())

    def _request_requeue(self, signum: int):
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, None)  # submitit: checkpoint-and-requeue (rank 0; may exit here)
        elif (
            signum == signal.SIGUSR1
            and comm.is_main_process()
            and "SLURM_JOB_ID" in os.environ
            and "SUBMITIT_EXECUTOR" not in os.environ
        ):
            _scontrol_requeue(os.environ["SLURM_JOB_ID"])

    def after_train(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        finished = self.trainer.iter >= self.trainer.max_iter
        if self._group is not None and finished:  # after a failure a peer may not answer
            dist.destroy_process_group(self._group)
        self._group = None


def _flush_device_metrics(trainer):
    """Read back the losses a :class:`.step.DeviceMetricsTrainer` keeps on the device (and
    check them) before a checkpoint, as at the iterations it flushes by itself."""
    step = getattr(trainer, "_trainer", None)
    if isinstance(step, DeviceMetricsTrainer):
        step.flush_metrics()


def _scontrol_requeue(job_id: str):
    try:
        subprocess.run(
            ["scontrol", "requeue", job_id], check=True, timeout=60, capture_output=True, text=True
        )
        logger.warning(f"Requeued SLURM job {job_id}.")
    except (OSError, subprocess.SubprocessError) as e:
        logger.error(f"Could not requeue SLURM job {job_id} (scontrol requeue): {e}")
