"""Helpers shared by the tests."""
import os
import subprocess
import sys

from insloc_detco.engine import launch

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_distributed(fn, world_size: int = 2, args=()):
    """Run ``fn(*args)`` in ``world_size`` CPU processes over gloo (detectron2's launch).
    ``fn`` must be a module-level function; raise inside it to fail the test."""
    launch(fn, world_size, num_machines=1, machine_rank=0, dist_url="auto", args=args)


def run_train_net(*argv, timeout=600):
    """Run ``train_net.py`` as a user would; returns the CompletedProcess (check=True)."""
    cmd = [sys.executable, os.path.join(PROJECT_DIR, "train_net.py"), *map(str, argv)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        cmd, cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
