"""Thread discipline: one rule for every launch path, overridable, logged."""

import logging
import os

import pytest
import torch
from conftest import load_config
from detectron2.utils import comm
from insloc_testing import run_distributed

from insloc_detco.engine import threads
from insloc_detco.engine.threads import configure_threads, main_process_threads


def test_cuda_processes_leave_the_cores_to_their_loader_workers():
    # One H100 node of the issue: 16 cores, 15 workers -> 1 thread (was PyTorch's 16).
    assert (
        main_process_threads(cores=16, local_processes=1, workers_per_process=15, on_cuda=True) == 1
    )
    # 8 GPUs, 96 cores, 8 workers each: 12 cores per process, 4 left after the workers.
    assert (
        main_process_threads(cores=96, local_processes=8, workers_per_process=8, on_cuda=True) == 4
    )
    # Never zero, even when the workers alone oversubscribe.
    assert (
        main_process_threads(cores=4, local_processes=2, workers_per_process=8, on_cuda=True) == 1
    )


def test_cpu_training_keeps_pytorchs_default_for_one_process(monkeypatch):
    monkeypatch.setattr(threads, "_TORCH_DEFAULT_THREADS", 2)
    assert (
        main_process_threads(cores=2, local_processes=1, workers_per_process=1, on_cuda=False) == 2
    )
    # Several CPU processes share the cores instead of each taking all of them.
    monkeypatch.setattr(threads, "_TORCH_DEFAULT_THREADS", 16)
    assert (
        main_process_threads(cores=16, local_processes=4, workers_per_process=2, on_cuda=False) == 4
    )


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_precedence_config_then_environment_then_auto(monkeypatch, caplog, restore_threads):
    cfg = load_config("instant_test/pretrain_moco_v2.yaml")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with caplog.at_level(logging.INFO, logger="insloc_detco.engine.threads"):
        assert configure_threads(cfg) == 1 and torch.get_num_threads() == 1
    assert "OMP_NUM_THREADS" in caplog.text
    cfg.DATALOADER.MAIN_PROCESS_THREADS = 2
    assert configure_threads(cfg) == 2 and torch.get_num_threads() == 2
    cfg.DATALOADER.MAIN_PROCESS_THREADS = 0
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads, "_available_cores", lambda: 16)
    cfg.MODEL.DEVICE, cfg.DATALOADER.NUM_WORKERS = "cuda", 15
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="insloc_detco.engine.threads"):
        assert configure_threads(cfg) == 1
    assert "auto: 16 cores / 1 local process(es) - 15 loader workers each" in caplog.text


def _threads_per_rank(cores):
    threads._available_cores = lambda: cores
    cfg = load_config("instant_test/pretrain_moco_v2.yaml")
    os.environ.pop("OMP_NUM_THREADS", None)
    threads._TORCH_DEFAULT_THREADS = cores
    got = comm.all_gather(configure_threads(cfg))
    assert got == [cores // 2, cores // 2], got


@pytest.mark.slow
def test_two_launched_processes_split_the_cores():
    run_distributed(_threads_per_rank, 2, args=(8,))
