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


def test_rank_0_waits_for_a_port_a_previous_attempt_still_holds(monkeypatch):
    import importlib
    import socket
    import threading
    from datetime import timedelta

    from insloc_detco.engine.cluster_env import LaunchedProcess

    launch_module = importlib.import_module("insloc_detco.engine.launch")

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setattr(launch_module, "_PORT_RETRY_S", 0.2)
    threading.Timer(1.0, held.close).start()  # the previous attempt's process exits
    p = LaunchedProcess("submitit-local", 0, 1, 0, 1, "127.0.0.1", port)
    store = launch_module._rendezvous(p, timedelta(seconds=30))
    store.set("k", "v")
    assert store.get("k") == b"v"
    # A port that stays busy fails after the timeout, with the cause.
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    monkeypatch.setenv("MASTER_PORT", str(busy.getsockname()[1]))
    p = LaunchedProcess("submitit-local", 0, 1, 0, 1, "127.0.0.1", busy.getsockname()[1])
    with pytest.raises(Exception, match="EADDRINUSE"):
        launch_module._rendezvous(p, timedelta(seconds=1))
    busy.close()
