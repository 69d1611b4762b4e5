"""
What every evaluation run needs, written once for ``eval_transfer.py run`` and
``eval_readout.py``. A runner:

1. checks its inputs in the launching process, before any worker starts;
2. launches the workers (:class:`Launch`: our :func:`.launch.launch`, the loggers set up in
   each process; or joins them under torchrun / srun; or submits a SLURM job per call);
3. lets the main process write each result with one stamp (:func:`stamped`: world size, wall
   time, machine, date, versions);
4. merges the results into a folder's ``results.json`` and renders ``results.md``
   (:func:`merge_results_files`).

The launch options of every entry script (``train_net.py`` too) are those of
:func:`add_launch_arguments`.
"""

import argparse
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Dict, Optional, Sequence

import detectron2
import numpy as np
import torch
import torchvision
from detectron2.utils import comm

from .cluster_env import LaunchError, detect_launcher
from .launch import DEFAULT_DIST_TIMEOUT_S, dist_timeout, is_launch_leader, launch
from .log_setup import setup_logging
from .slurm import add_slurm_arguments, submit

__all__ = [
    "RANDOM_INIT",
    "default_output_dir",
    "Launch",
    "add_launch_arguments",
    "stamped",
    "machine_description",
    "now",
    "versions",
    "write_json",
    "read_json",
    "merge_results_files",
    "mean_std",
    "format_mean_std",
]

RANDOM_INIT = "random"  # the weights argument that measures detectron2's random initialisation


def default_output_dir(weights: str, kind: str) -> str:
    """``<kind>/`` next to a checkpoint; ``output/<kind>_random_init`` for random init."""
    if weights == RANDOM_INIT:
        return os.path.join("output", f"{kind}_random_init")
    return os.path.join(os.path.dirname(os.path.abspath(weights)), kind)


# ------------------------------------------------------------------------------------------
# Launching
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    """
    Where the workers of a run go: the arguments of detectron2's ``launch``, the distributed
    timeout, and optionally a SLURM job per call instead (``--slurm``, :meth:`submit`). Under
    torchrun or srun every process runs the entry script and joins the job (:mod:`.launch`).
    """

    num_gpus: int = 1  # processes per machine
    num_machines: int = 1
    machine_rank: int = 0
    dist_url: str = "auto"
    dist_timeout: Optional[float] = None  # seconds; None: $INSLOC_DIST_TIMEOUT or the default
    slurm: Optional[argparse.Namespace] = field(default=None, compare=False, repr=False)  # --slurm

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Launch":
        """
        From the options of :func:`add_launch_arguments`.

        Raises:
            LaunchError: ``--slurm`` with process options (the job's tasks are the processes).
        """
        slurm = args if getattr(args, "slurm", False) else None
        launch = cls(
            args.num_gpus,
            args.num_machines,
            args.machine_rank,
            args.dist_url,
            getattr(args, "dist_timeout", None),
            slurm,
        )
        if launch.submits and launch.world_size > 1:
            raise LaunchError(
                "--slurm starts one task per GPU (--nodes x --gpus-per-node): leave out "
                "--num-gpus and --num-machines."
            )
        return launch

    @property
    def world_size(self) -> int:
        return self.num_gpus * self.num_machines

    @property
    def machines(self) -> int:
        """The machines the workers run on (those of the job when joined or submitted)."""
        if self.submits:
            return self.slurm.nodes
        joined = detect_launcher()
        return joined.num_nodes if joined is not None else self.num_machines

    @property
    def collects_results(self) -> bool:
        """Whether this process reads the results back and writes the tables: the first
        machine's launching process, or rank 0 where every worker runs the entry script."""
        return is_launch_leader(self.machine_rank)

    @property
    def submits(self) -> bool:
        """Whether each call is submitted as a SLURM job (:meth:`submit`)."""
        return self.slurm is not None

    def __call__(self, main_func: Callable, *args):
        """``main_func(*args)`` in every process, with console logging set up in each."""
        launch(
            _with_logging,
            self.num_gpus,
            self.num_machines,
            self.machine_rank,
            self.dist_url,
            args=(main_func, *args),
            timeout=dist_timeout(self.dist_timeout),
        )

    def submit(self, folder: str, name: str, main_func: Callable, *args) -> str:
        """
        ``main_func(*args)`` in the tasks of a SLURM job (:mod:`.slurm`; they join the job's
        process group), its stdout/stderr in ``folder``. Returns the job id.
        """
        in_job = Launch(dist_timeout=self.dist_timeout)
        return submit(in_job, (main_func, *args), self.slurm, folder, name).job_id


def _with_logging(main_func: Callable, *args):
    setup_logging(None, comm.get_rank())
    return main_func(*args)


def add_launch_arguments(
    parser: argparse.ArgumentParser, processes: bool = True, slurm: bool = False
):
    """
    The launch options of every entry script:

    * ``processes``: ``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``
      (as detectron2's; ``train_net.py`` has them from ``default_argument_parser``);
    * always ``--dist-timeout``;
    * ``slurm``: ``--slurm`` and the job's resources (:func:`.slurm.add_slurm_arguments`).
    """
    if processes:
        parser.add_argument("--num-gpus", type=int, default=1, help="processes per machine")
        parser.add_argument("--num-machines", type=int, default=1)
        parser.add_argument("--machine-rank", type=int, default=0)
        parser.add_argument(
            "--dist-url", default="auto", help="e.g. tcp://HOST:PORT with several machines"
        )
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long processes wait for a silent peer before the run ends, naming it "
        f"(default: $INSLOC_DIST_TIMEOUT or {DEFAULT_DIST_TIMEOUT_S:.0f})",
    )
    if slurm:
        add_slurm_arguments(parser)


# ------------------------------------------------------------------------------------------
# The result stamp
# ------------------------------------------------------------------------------------------
def stamped(entry: Dict, start: float) -> Dict:
    """
    ``entry`` with the stamp of the run that computed it (call in the main process).

    Args:
        start: ``time.perf_counter()`` when the work began.
    Returns:
        ``entry`` + ``world_size``, ``wall_s``, ``machine``, ``date``, ``versions``.
    """
    return {
        **entry,
        "world_size": comm.get_world_size(),
        "wall_s": round(time.perf_counter() - start, 1),
        "machine": machine_description(),
        "date": now(),
        "versions": versions(),
    }


def machine_description() -> str:
    """e.g. '8x NVIDIA A100-SXM4-40GB' or 'CPU x86_64 (16 cores)'; no host names."""
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"{n}x {torch.cuda.get_device_name(0)}"
    return f"CPU {platform.machine()} ({os.cpu_count()} cores)"


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def versions() -> Dict[str, str]:
    """The software a number was computed with."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "detectron2": detectron2.__version__,
    }


# ------------------------------------------------------------------------------------------
# Results files and tables
# ------------------------------------------------------------------------------------------
def _clean(x):
    """JSON-safe: numpy scalars to float, NaN to None."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_json(path: str, data: Dict):
    """Atomic write: a trial's results.json is its 'finished' marker."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_clean(data), f, indent=2)
    os.replace(tmp, path)


def read_json(path: str) -> Dict:
    with open(path) as f:
        return json.load(f)


def merge_results_files(
    output_dir: str, entries: Dict[str, Dict], render: Callable[[Dict[str, Dict]], str]
) -> str:
    """
    Merge ``entries`` into ``<output_dir>/results.json`` (entries of earlier runs are kept,
    same keys replaced) and rewrite ``results.md`` as ``render(merged)``.

    Returns:
        the Markdown written.
    """
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "results.json")
    merged = read_json(path) if os.path.isfile(path) else {}
    merged.update(entries)
    write_json(path, merged)
    text = render(merged)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(text)
    return text


def mean_std(values: Sequence[float]) -> Dict:
    """{"mean", "std" (sample std; None for one value), "n", "values"}."""
    values = [float(v) for v in values]
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
        "n": len(values),
        "values": values,
    }


def format_mean_std(stat: Optional[Dict], missing: str = "n/a") -> str:
    """A :func:`mean_std` as "m ± s" (one decimal; "m" for one value; ``missing`` for None)."""
    if stat is None:
        return missing
    if stat["std"] is None:
        return f"{stat['mean']:.1f}"
    return f"{stat['mean']:.1f} ± {stat['std']:.1f}"
