"""insloc_detco.engine.launch: spawned workers shut down in order; one process is left alone."""

import os

import pytest
from detectron2.utils import comm
from insloc_testing import run_distributed

from insloc_detco.engine import launch


def _rank():
    return comm.get_rank()


def _inner_launch_then_talk(out_dir):
    # A one-process launch runs in this (already distributed) process: it must not tear down
    # this process's group nor end the process.
    assert launch(_rank, 1) is None  # detectron2's launch returns nothing
    ranks = comm.all_gather(comm.get_rank())  # the group still works
    with open(os.path.join(out_dir, f"rank{comm.get_rank()}"), "w") as f:
        f.write(",".join(map(str, ranks)))


@pytest.mark.slow
def test_one_process_launch_leaves_the_callers_process_group(tmp_path):
    run_distributed(_inner_launch_then_talk, 2, args=(str(tmp_path),))
    for r in (0, 1):
        assert (tmp_path / f"rank{r}").read_text() == "0,1"
