"""Start the processes of a run, or join those a cluster launcher started; end them in order.

Two ways in, one ``launch`` call for every entry point:

* **Started by hand** (no launcher variables, see :mod:`.cluster_env`): detectron2's ``launch``
  spawns ``--num-gpus`` processes per machine, as before. The parent forwards the preemption
  signals (SIGTERM, SIGUSR1, SIGUSR2) to its workers, which it alone receives from e.g.
  Kubernetes.
* **Started by torchrun, SLURM (srun, submitit) or a PyTorchJob**: this process *is* one of the
  workers. It joins the job through an ``env://`` rendezvous (NCCL on CUDA, gloo on the CPU),
  uses ``cuda:LOCAL_RANK`` and creates detectron2's local process group, once; later ``launch``
  calls of the same process (one per transfer trial) reuse the group. A command line that asks
  for processes as well (``--num-gpus 8`` under torchrun) is an error, not 8 x 8 processes.

Every process of a multi-process run gets a :class:`.watchdog.Watchdog` (a lost rank ends the
run with a message naming it, instead of a hang) and leaves through :func:`exit_process`:
detectron2 leaves the process groups alive, and with torch 2.14 + gloo about one two-process
run in four then aborted at interpreter exit ("terminate called without an active exception",
SIGABRT) although the work had succeeded; the groups are destroyed and the process leaves with
``os._exit`` after flushing its logs.
"""

import logging
import multiprocessing
import os
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

from .cluster_env import LaunchedProcess, LaunchError, detect_launcher
from .preemption import PREEMPTION_SIGNALS, TrainingPreempted, preempted_exit_codes
from .watchdog import Watchdog, active_watchdog, report

__all__ = [
    "DEFAULT_DIST_TIMEOUT_S",
    "LaunchError",
    "launch",
    "dist_timeout",
    "exit_process",
    "run_entry_point",
    "is_launch_leader",
    "leave_joined_launch",
]

logger = logging.getLogger(__name__)

# How long a process waits for a silent peer before the run ends (collectives, the watchdog);
# overridden by --dist-timeout or $INSLOC_DIST_TIMEOUT (seconds). detectron2's is 30 minutes.
DEFAULT_DIST_TIMEOUT_S = 600.0
# The collectives time out a little after the watchdog, so that its message (which rank was
# lost) comes first.
_COLLECTIVE_MARGIN_S = 60.0

_joined: Optional[LaunchedProcess] = None  # set once this process joined an external launch


def dist_timeout(seconds: Optional[float] = None) -> timedelta:
    """``seconds``, else ``$INSLOC_DIST_TIMEOUT``, else :data:`DEFAULT_DIST_TIMEOUT_S`."""
    if seconds is None:
        seconds = float(os.environ.get("INSLOC_DIST_TIMEOUT", DEFAULT_DIST_TIMEOUT_S))
    if seconds <= 0:
        raise LaunchError(f"The distributed timeout must be > 0 seconds, not {seconds}.")
    return timedelta(seconds=seconds)


def _collective_timeout(timeout: timedelta) -> timedelta:
    return timeout + timedelta(seconds=_COLLECTIVE_MARGIN_S)


def launch(
    main_func,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url=None,
    args=(),
    timeout: Optional[timedelta] = None,
):
    """
    Run ``main_func(*args)`` in every process of the run.

    Args:
        num_gpus_per_machine, num_machines, machine_rank, dist_url: as detectron2's ``launch``;
            under an external launcher they must be left at their defaults (or agree with it).
        timeout: how long a silent peer is waited for (:func:`dist_timeout` if None).
    Returns:
        what ``main_func`` returns where it runs in this process (one process, or joined: once
        every process has returned from it).
    Raises:
        LaunchError: launcher variables that are incomplete or contradict the arguments.
    """
    timeout = timeout or dist_timeout()
    joined = detect_launcher()
    if joined is None:
        spawns = num_gpus_per_machine * num_machines > 1
        with _forwarding_preemption_signals(spawns):
            try:
                return d2_launch(
                    _run_spawned,
                    num_gpus_per_machine,
                    num_machines,
                    machine_rank,
                    dist_url,
                    args=(main_func, spawns, timeout, *args),
                    timeout=_collective_timeout(timeout),
                )
            except mp.ProcessExitedException as e:
                if e.exit_code in preempted_exit_codes():  # the workers saved and left
                    raise TrainingPreempted(e.exit_code - 128) from None
                raise
    _check_no_spawn_request(joined, num_gpus_per_machine, num_machines, machine_rank, dist_url)
    if not (dist.is_available() and dist.is_initialized()):
        _join(joined, timeout)
    try:
        result = main_func(*args)
    except Exception as e:
        _explain_lost_ranks(e)
        raise
    comm.synchronize()  # as after spawned workers: what rank 0 wrote is there for every rank
    return result


def is_launch_leader(machine_rank: int = 0) -> bool:
    """Whether this process writes what a launching process writes once per run (tables,
    converted weights): machine 0's, or rank 0 of an external launch (where every worker
    runs the entry point)."""
    joined = detect_launcher()
    return joined.rank == 0 if joined is not None else machine_rank == 0


def run_entry_point(main, *args):
    """
    ``sys.exit(main(*args))`` for an entry script, through :func:`exit_process`. A
    :class:`LaunchError` is printed as a one-line error (exit status 2).
    """
    try:
        code = main(*args)
    except SystemExit as e:  # TrainingPreempted, submitit's requeue, argparse
        code = e.code
    except LaunchError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        code = 2
    except BaseException:
        traceback.print_exc()
        code = 1
    exit_process(code)


def exit_process(code=0):
    """
    Leave the process with ``code`` (None: 0; a string is printed, status 1). A process that
    joined an external launch first waits for its peers (on success), destroys its process
    groups and leaves without interpreter finalisation (see the module docstring).
    """
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    code = code or 0
    if _joined is None:
        sys.exit(code)
    _shut_down(wait_for_peers=code == 0)
    _flush()
    os._exit(code)


def leave_joined_launch():
    """For a joined process that lives on after its work (a submitit task returns its result):
    wait for the peers and destroy the process groups; a later ``launch`` joins again."""
    global _joined
    if _joined is not None:
        _shut_down(wait_for_peers=True)
        _joined = None


# ------------------------------------------------------------------------------------------
# Joining an external launch
# ------------------------------------------------------------------------------------------
def _check_no_spawn_request(p: LaunchedProcess, num_gpus, num_machines, machine_rank, dist_url):
    asked = []
    if num_gpus not in (1, p.local_world_size):
        asked.append(f"--num-gpus {num_gpus}")
    if num_machines not in (1, p.num_nodes):
        asked.append(f"--num-machines {num_machines}")
    if machine_rank not in (0, p.node_rank):
        asked.append(f"--machine-rank {machine_rank}")
    if dist_url not in (None, "auto", _detectron2_default_dist_url()):
        asked.append(f"--dist-url {dist_url}")
    if asked:
        raise LaunchError(
            f"This process was started by {p.launcher} as rank {p.rank} of {p.world_size}; "
            f"{', '.join(asked)} would start processes or a rendezvous of their own. Leave them "
            f"out: {p.launcher} decides the processes (one per GPU) and the rendezvous."
        )


def _detectron2_default_dist_url() -> str:
    from detectron2.engine import default_argument_parser

    return default_argument_parser().get_default("dist_url")


def _join(p: LaunchedProcess, timeout: timedelta):
    global _joined
    os.environ.setdefault("MASTER_ADDR", p.master_addr)
    os.environ.setdefault("MASTER_PORT", str(p.master_port))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(_cuda_device(p))
    try:
        store = _rendezvous(p, timeout)
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            store=store,
            rank=p.rank,
            world_size=p.world_size,
            timeout=_collective_timeout(timeout),
        )
    except Exception as e:
        raise LaunchError(
            f"Could not join the job ({p.describe()}) within {timeout}: {e}. Are all "
            f"{p.world_size} processes started, and can they reach {p.master_addr}:"
            f"{p.master_port}?"
        ) from e
    _joined = p
    comm.create_local_process_group(p.local_world_size)
    Watchdog(store, p.rank, p.world_size, timeout.total_seconds()).start()
    comm.synchronize()
    logger.info(f"Joined {p.describe()}.")


def _rendezvous(p: LaunchedProcess, timeout: timedelta):
    """The job's store. A requeued job reuses its port, which a previous attempt's exiting
    processes (e.g. data-loader workers forked after the store opened) may hold a few seconds
    longer: rank 0 retries a busy port until ``timeout``."""
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        try:
            left = timedelta(seconds=max(deadline - time.monotonic(), 1.0))
            return next(dist.rendezvous("env://", p.rank, p.world_size, timeout=left))[0]
        except Exception as e:
            if "EADDRINUSE" not in str(e) or time.monotonic() + _PORT_RETRY_S > deadline:
                raise
            logger.warning(f"Port {p.master_port} is busy; retrying in {_PORT_RETRY_S:.0f} s.")
            time.sleep(_PORT_RETRY_S)


_PORT_RETRY_S = 2.0


def _cuda_device(p: LaunchedProcess) -> int:
    count = torch.cuda.device_count()
    if p.local_rank < count:
        return p.local_rank
    if count == 1:  # the scheduler shows each task its own GPU (e.g. srun --gpus-per-task 1)
        return 0
    raise LaunchError(
        f"{p.launcher} local rank {p.local_rank} but {count} visible GPUs: start one process "
        "per GPU (torchrun --nproc_per_node, srun --ntasks-per-node = GPUs per node)."
    )


def _shut_down(wait_for_peers: bool):
    watchdog = active_watchdog()
    if dist.is_available() and dist.is_initialized():
        if wait_for_peers:
            comm.synchronize()  # no rank tears down while a peer still talks to it
        if watchdog is not None:
            watchdog.stop()
        dist.destroy_process_group()  # all groups, detectron2's local group included
        comm._LOCAL_PROCESS_GROUP = None  # detectron2 keeps a handle to the destroyed group


def _flush():
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()


def _explain_lost_ranks(error: Exception):
    """After a failed collective (a peer closed its connection): name the lost rank."""
    watchdog = active_watchdog()
    text = f"{type(error).__name__} {error}".lower()
    if watchdog is None or not any(w in text for w in ("gloo", "nccl", "connection", "peer")):
        return
    lost = watchdog.wait_for_lost_ranks()
    if lost:
        report(lost)


# ------------------------------------------------------------------------------------------
# Processes spawned by detectron2's launch
# ------------------------------------------------------------------------------------------
def _run_spawned(main_func, spawned: bool, timeout: timedelta, *args):
    # detectron2 spawns workers exactly when the world has more than one process; otherwise it
    # calls main_func in the caller's process, which must be left as it is (it may even hold a
    # process group of its own).
    if not spawned:
        return main_func(*args)
    store = _default_store()
    if store is not None:
        Watchdog(store, comm.get_rank(), comm.get_world_size(), timeout.total_seconds()).start()
    try:
        main_func(*args)
    except TrainingPreempted as e:  # saved: leave without waiting for anyone
        _shut_down(wait_for_peers=False)
        _flush()
        os._exit(e.code)
    except Exception as e:
        _explain_lost_ranks(e)
        raise
    # os._exit skips the C++ finalisation, which can abort on a thread still joinable (seen in
    # CI); torch's spawn discards the return value anyway, the exit code is what counts.
    _shut_down(wait_for_peers=True)
    _flush()
    os._exit(0)


def _default_store():
    try:  # the store detectron2's tcp:// rendezvous created (torch has no public accessor)
        return dist.distributed_c10d._get_default_store()
    except Exception:  # pragma: no cover - a torch without it: collectives' timeouts only
        return None


@contextmanager
def _forwarding_preemption_signals(spawns: bool):
    """In the parent of spawned workers: pass SIGTERM/SIGUSR1/SIGUSR2 on to them (a scheduler
    may signal only the process it started)."""
    if not spawns:
        yield
        return

    def forward(signum, frame):
        for child in multiprocessing.active_children():
            try:
                os.kill(child.pid, signum)
            except OSError:
                pass

    previous = {s: signal.signal(s, forward) for s in PREEMPTION_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
