"""Submission to SLURM in one command, through submitit (as DINO, MAE and ConvNeXt do).

``--slurm`` turns an entry script's command into a job of ``--nodes`` x ``--gpus-per-node``
tasks (one process per GPU). The job runs the same function the command would have run here;
in it, :func:`insloc_detco.engine.launch` finds the SLURM tasks and joins them. submitit
writes the job's stdout/stderr to ``<folder>/<job id>_<task>_log.{out,err}`` (the entry scripts
use ``OUTPUT_DIR/submitit``), next to the run's own ``log.txt``.

Time limits and preemption: submitit asks SLURM for SIGUSR2 ``--signal-delay`` seconds before
the time limit; training saves at an iteration every rank agrees on, then submitit requeues the
job (:mod:`.preemption`), up to ``--max-timeouts`` times; the requeued job resumes by itself.
``--submitit-cluster local`` runs the same job as processes of this machine (tests, no cluster).
"""

import argparse
import os
import re
from typing import Callable, Optional

__all__ = ["add_slurm_arguments", "time_limit_minutes", "build_executor", "SubmititJob", "submit"]


def add_slurm_arguments(parser: argparse.ArgumentParser):
    """``--slurm`` and the job's resources (the entry scripts add them through
    :func:`.runs.add_launch_arguments`)."""
    g = parser.add_argument_group("SLURM (submitit): submit instead of running here")
    g.add_argument("--slurm", action="store_true", help="submit the command as a SLURM job")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=8, help="one task (process) per GPU")
    g.add_argument(
        "--tasks-per-node", type=int, default=None, help="default: --gpus-per-node (1 without GPUs)"
    )
    g.add_argument("--cpus-per-task", type=int, default=10)
    g.add_argument("--mem", default=None, help="memory per node, e.g. 480G (0: all)")
    g.add_argument("--time", default="72:00:00", help="time limit: [D-]HH:MM:SS or minutes")
    g.add_argument("--partition", default=None)
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", default=None, help="e.g. volta32gb")
    g.add_argument("--exclude", default=None, help="nodes to avoid")
    g.add_argument("--comment", default=None)
    g.add_argument("--job-name", default=None, help="default: the run folder's name")
    g.add_argument(
        "--signal-delay",
        type=int,
        default=120,
        help="seconds before the time limit when the job saves and requeues",
    )
    g.add_argument(
        "--max-timeouts",
        type=int,
        default=20,
        help="times a job may reach its time limit and be requeued",
    )
    g.add_argument(
        "--submitit-cluster",
        choices=("slurm", "local"),
        default="slurm",
        help="local: run the job as processes of this machine (no cluster; tests)",
    )


def time_limit_minutes(text: str) -> int:
    """SLURM's time formats: ``MM``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``, ``MM:SS``."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise ValueError(f"--time {text!r}: use [D-]HH:MM:SS or minutes.")
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = a, b or 0, c or 0
    elif c is not None:  # HH:MM:SS
        hours, minutes, seconds = a, b, c
    elif b is not None:  # MM:SS
        hours, minutes, seconds = 0, a, b
    else:  # MM
        hours, minutes, seconds = 0, a, 0
    total = ((days or 0) * 24 + hours) * 60 + minutes + (seconds > 0)
    if total <= 0:
        raise ValueError(f"--time {text!r} is no time at all.")
    return total


def build_executor(args, folder: str, name: str):
    """A submitit executor for ``args`` (see :func:`add_slurm_arguments`)."""
    try:
        import submitit
    except ImportError:
        from .cluster_env import LaunchError

        raise LaunchError(
            "--slurm submits through submitit, which is not installed: pip install submitit "
            "(scripts/setup_env.sh installs it)."
        ) from None

    tasks = args.tasks_per_node or max(1, args.gpus_per_node)
    executor = submitit.AutoExecutor(
        folder=folder, cluster=args.submitit_cluster, slurm_max_num_timeout=args.max_timeouts
    )
    executor.update_parameters(
        name=args.job_name or name,
        nodes=args.nodes,
        tasks_per_node=tasks,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        timeout_min=time_limit_minutes(args.time),
        slurm_partition=args.partition,
        slurm_account=args.account,
        slurm_qos=args.qos,
        slurm_constraint=args.constraint,
        slurm_exclude=args.exclude,
        slurm_comment=args.comment,
        slurm_mem=args.mem,
        slurm_signal_delay_s=args.signal_delay,
    )
    return executor


class SubmititJob:
    """
    ``fn(*args)`` as a submitit job. Requeued after a time limit or preemption, it runs
    ``fn(*args)`` again (:meth:`checkpoint`), which resumes from the run folder.
    """

    def __init__(self, fn: Callable, *args):
        self.fn, self.args = fn, args

    def __call__(self):
        from .launch import exit_process, leave_joined_launch

        try:
            result = self.fn(*self.args)
        except SystemExit as e:  # preempted: saved (and requeued by submitit on rank 0)
            exit_process(e.code)
        leave_joined_launch()
        return result

    def checkpoint(self, *args, **kwargs):
        """submitit calls it before requeueing: the same call (the run folder holds the state)."""
        import submitit

        return submitit.helpers.DelayedSubmission(SubmititJob(self.fn, *self.args))


def submit(fn: Callable, args: tuple, options, folder: str, name: Optional[str] = None):
    """Submit ``fn(*args)`` with the resources of ``options``; logs go to ``folder``."""
    os.makedirs(folder, exist_ok=True)
    executor = build_executor(options, folder, name or os.path.basename(os.path.dirname(folder)))
    return executor.submit(SubmititJob(fn, *args))
