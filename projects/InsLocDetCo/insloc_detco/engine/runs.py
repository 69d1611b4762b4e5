"""
What every evaluation run needs, written once for ``eval_transfer.py run`` and
``eval_readout.py``. A runner:

1. checks its inputs in the launching process, before any worker starts;
2. launches the workers (:class:`Launch`: our :func:`.launch.launch`, the loggers set up in
   each process);
3. lets the main process write each result with one stamp (:func:`stamped`: world size, wall
   time, machine, date, versions);
4. merges the results into a folder's ``results.json`` and renders ``results.md``
   (:func:`merge_results_files`).
"""

import argparse
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Dict, Optional, Sequence

import detectron2
import numpy as np
import torch
import torchvision
from detectron2.utils import comm

from .launch import launch
from .log_setup import setup_logging

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
    """Where the workers of a run go: the arguments of detectron2's ``launch``."""

    num_gpus: int = 1  # processes per machine
    num_machines: int = 1
    machine_rank: int = 0
    dist_url: str = "auto"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Launch":
        """From the options of :func:`add_launch_arguments`."""
        return cls(args.num_gpus, args.num_machines, args.machine_rank, args.dist_url)

    @property
    def world_size(self) -> int:
        return self.num_gpus * self.num_machines

    @property
    def collects_results(self) -> bool:
        """Whether this launching process reads the results back (the first machine's)."""
        return self.machine_rank == 0

    def __call__(self, main_func: Callable, *args):
        """``main_func(*args)`` in every process, with console logging set up in each."""
        launch(
            _with_logging,
            self.num_gpus,
            self.num_machines,
            self.machine_rank,
            self.dist_url,
            args=(main_func, *args),
        )


def _with_logging(main_func: Callable, *args):
    setup_logging(None, comm.get_rank())
    return main_func(*args)


def add_launch_arguments(parser: argparse.ArgumentParser):
    """``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url`` (as detectron2's)."""
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per machine")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0)
    parser.add_argument(
        "--dist-url", default="auto", help="e.g. tcp://HOST:PORT with several machines"
    )


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
