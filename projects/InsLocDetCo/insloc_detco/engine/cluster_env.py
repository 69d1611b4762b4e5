"""Which launcher started this process, read once from its environment variables.

A scheduler or launcher that starts one process per GPU tells each process its place in the job
through environment variables; :func:`detect_launcher` reads them into one
:class:`LaunchedProcess`:

* **torchrun / TorchElastic**, and Kubernetes' PyTorchJob (same variables): ``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``.
* **SLURM tasks** (``srun``, or ``sbatch`` through submitit): ``SLURM_PROCID``,
  ``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_NODEID``, ``SLURM_STEP_NODELIST``. The first host
  of the step's node list is the rendezvous address, the port is derived from the job id (the
  same in every task), unless ``MASTER_ADDR`` / ``MASTER_PORT`` are exported.
* **submitit's local executor** (several tasks on this machine, used to test submissions
  without a cluster): ``SUBMITIT_LOCAL_GLOBALID``, ``SUBMITIT_LOCAL_NTASKS``, ...

The variables of the innermost launcher win: ``torchrun`` started by ``srun`` (one task per
node) is a torchrun launch. A single SLURM task is no launch at all (``srun python
train_net.py --num-gpus 8`` spawns its workers as before).
"""

import os
import re
import shutil
import subprocess
import zlib
from dataclasses import dataclass
from typing import Mapping, Optional

__all__ = ["LaunchedProcess", "LaunchError", "detect_launcher", "first_host", "port_for_job"]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_PORT_RANGE = (20000, 60000)
_NON_TASK_STEPS = ("batch", "extern", "4294967294", "4294967293")  # SLURM_BATCH/EXTERN_SCRIPT


class LaunchError(RuntimeError):
    """The launch environment is incomplete or contradicts the command line."""


@dataclass(frozen=True)
class LaunchedProcess:
    """This process's place in a job started by an external launcher."""

    launcher: str  # "torchrun", "slurm" or "submitit-local"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    @property
    def node_rank(self) -> int:
        return self.rank // self.local_world_size

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.local_world_size

    def describe(self) -> str:
        return (
            f"{self.launcher}: rank {self.rank} of {self.world_size} (local rank "
            f"{self.local_rank} of {self.local_world_size} on node {self.node_rank} of "
            f"{self.num_nodes}), rendezvous env://{self.master_addr}:{self.master_port}"
        )


def detect_launcher(env: Mapping[str, str] = os.environ) -> Optional[LaunchedProcess]:
    """
    The launch this process belongs to, or None when it was started by hand (one process, or
    several that ``launch`` will spawn).

    Raises:
        LaunchError: the variables are incomplete (e.g. ``RANK`` without ``WORLD_SIZE``) or
            inconsistent (a rank outside the world, ranks not laid out node by node).
    """
    if "RANK" in env or "WORLD_SIZE" in env:  # MASTER_* alone may be exported for srun
        found = _from_torchrun(env)
    elif env.get("SUBMITIT_EXECUTOR") == "local" and "SUBMITIT_LOCAL_GLOBALID" in env:
        found = _from_submitit_local(env)
    elif _in_srun_step(env) and _int(env, "SLURM_NTASKS", 1) > 1:
        found = _from_slurm(env)
    else:
        return None
    _check_layout(found)
    return found


def _in_srun_step(env) -> bool:
    # The batch script itself (and the "extern" step) is not a task of a parallel step: a
    # `python train_net.py` there, without srun, is one process whatever SLURM_NTASKS says.
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    return "SLURM_PROCID" in env and step is not None and step not in _NON_TASK_STEPS


def _from_torchrun(env) -> LaunchedProcess:
    missing = [v for v in _TORCHRUN_VARS if v not in env]
    if missing:
        raise LaunchError(
            f"{', '.join(v for v in _TORCHRUN_VARS if v in env)} set but not {', '.join(missing)}: "
            "start with torchrun (which sets all of RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), "
            "or unset them to start the processes with --num-gpus."
        )
    world = _int(env, "WORLD_SIZE")
    local_world = _int(env, "LOCAL_WORLD_SIZE", 1 if "LOCAL_RANK" not in env else world)
    return LaunchedProcess(
        "torchrun",
        _int(env, "RANK"),
        world,
        _int(env, "LOCAL_RANK", 0),
        local_world,
        env["MASTER_ADDR"],
        _int(env, "MASTER_PORT"),
    )


def _from_slurm(env) -> LaunchedProcess:
    world = _int(env, "SLURM_NTASKS")
    nodes = _int(env, "SLURM_STEP_NUM_NODES", _int(env, "SLURM_JOB_NUM_NODES", 1))
    if world % nodes:
        raise LaunchError(
            f"SLURM step of {world} tasks on {nodes} nodes: every node needs the same number of "
            "tasks (one per GPU): use --ntasks-per-node."
        )
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
    addr = env.get("MASTER_ADDR") or first_host(nodelist)
    port = int(env.get("MASTER_PORT") or port_for_job(env.get("SLURM_JOB_ID", "0")))
    return LaunchedProcess(
        "slurm",
        _int(env, "SLURM_PROCID"),
        world,
        _int(env, "SLURM_LOCALID", 0),
        world // nodes,
        addr,
        port,
    )


def _from_submitit_local(env) -> LaunchedProcess:
    world = _int(env, "SUBMITIT_LOCAL_NTASKS", 1)
    port = int(env.get("MASTER_PORT") or port_for_job(env.get("SUBMITIT_LOCAL_JOB_ID", "0")))
    return LaunchedProcess(
        "submitit-local",
        _int(env, "SUBMITIT_LOCAL_GLOBALID"),
        world,
        _int(env, "SUBMITIT_LOCAL_LOCALID", 0),
        world,
        "127.0.0.1",
        port,
    )


def _check_layout(p: LaunchedProcess):
    if not 0 <= p.rank < p.world_size or not 0 <= p.local_rank < p.local_world_size:
        raise LaunchError(f"Inconsistent launch variables: {p}.")
    # detectron2's local process group (comm.get_local_rank, the GPU of each process) assumes
    # the ranks of a node are consecutive and every node runs as many processes.
    if p.world_size % p.local_world_size or p.rank % p.local_world_size != p.local_rank:
        raise LaunchError(
            f"{p.launcher}: rank {p.rank} is local rank {p.local_rank} of {p.local_world_size}; "
            "the ranks of a node must be consecutive, with as many processes on every node (SLURM: "
            "--ntasks-per-node and the default block distribution)."
        )


def first_host(nodelist: str) -> str:
    """
    The first host of a SLURM node list (``gpu[003-004,010],cpu7`` -> ``gpu003``): from
    ``scontrol show hostnames`` where SLURM's tools are installed, else parsed here.
    """
    if not nodelist:
        raise LaunchError("SLURM tasks without SLURM_STEP_NODELIST / SLURM_JOB_NODELIST.")
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    depth, end = 0, len(nodelist)
    for i, c in enumerate(nodelist):  # the first item: up to a comma outside brackets
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            end = i
            break
    # Each [a-b,c] group contributes its first number, zero padding kept.
    return re.sub(r"\[([^],-]+)[^]]*\]", r"\1", nodelist[:end])


def port_for_job(job_id: str) -> int:
    """A rendezvous port that every task of a job derives alike (CRC of its id)."""
    low, high = _PORT_RANGE
    return low + zlib.crc32(str(job_id).encode()) % (high - low)


def _int(env, name: str, default: Optional[int] = None) -> int:
    value = env.get(name)
    if value is None:
        if default is None:
            raise LaunchError(f"{name} is not set.")
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{name}={value!r} is not an integer.") from None
