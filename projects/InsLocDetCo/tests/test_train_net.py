"""The README's pretraining commands, end to end at instant scale (CPU)."""

import json
import os
import shutil

import pytest
import torch
from insloc_testing import run_train_net

CONFIG = "instant_test/pretrain_moco_v2.yaml"


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _train(out, *extra):
    proc = run_train_net("--config-file", CONFIG, *extra, "OUTPUT_DIR", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def single_run(module_folder):
    out = str(module_folder("moco1"))
    log = _train(out, "--num-gpus", "1", "SOLVER.MAX_ITER", 6, "SOLVER.CHECKPOINT_PERIOD", 3)
    return out, log


@pytest.mark.slow
def test_single_process_run_writes_checkpoints_logs_and_curves(single_run):
    out, log = single_run
    for f in (
        "model_final.pth",
        "model_0000002.pth",
        "metrics.json",
        "curves.png",
        "config.yaml",
        "last_checkpoint",
        "model_final.pth.sha256",
    ):
        assert os.path.exists(os.path.join(out, f)), f
    # The last iteration (5) is written once, as model_final.pth.
    assert not os.path.exists(os.path.join(out, "model_0000005.pth"))
    assert "[metric]acc/moco" in log and "eta:" in log and "lr:" in log
    ckpt = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == 5
    assert int(ckpt["model"]["queue.ptr"]) == (6 * 8) % 64
    assert any(k.startswith("encoder_k.") for k in ckpt["model"])
    records = _metrics(out)
    assert all(r["total_loss"] == r["total_loss"] for r in records if "total_loss" in r)  # finite
    assert any("[metric]acc/moco" in r for r in records)
    assert max(r["iteration"] for r in records) == 5  # no record past the end


def test_log_is_readable(single_run):
    out, console = single_run
    with open(os.path.join(out, "log.txt")) as f:
        log = f.read()
    for line in (
        "insloc_detco.data.build INFO: Pretraining on 18 images",
        "Schedule: batch 8 (1 process(es) x 8 images), base lr 0.01",
        "Checkpoints: ~",
        "Wrote training curves",
        "Pretrained weights:",
    ):
        assert line in log and line.split(": ", 1)[-1] in console, line
    assert "\x1b" not in log and "\x1b" not in console  # no colour codes in files or pipes
    assert log.count("(res5)") == 1  # the model once: encoder_k is named, not printed again
    assert "(res5)" not in console and "Model: MoCoV2( ... )" in console  # a line there
    assert "Running with full config: " in console and "ANCHOR_GENERATOR" not in console
    assert "Warning" not in console  # the known third-party warnings are filtered


@pytest.mark.slow
def test_resume_continues_schedule_queue_and_momentum_encoder(single_run, tmp_path):
    full_out, _ = single_run
    out = str(tmp_path)
    # Pretend the run was interrupted while it wrote a checkpoint after the one of iteration 2:
    # last_checkpoint names a truncated file.
    for name in ("model_0000002.pth", "model_0000002.pth.sha256"):
        shutil.copy(os.path.join(full_out, name), out)
    with open(os.path.join(full_out, "model_final.pth"), "rb") as f:
        half = f.read()[: os.path.getsize(os.path.join(full_out, "model_final.pth")) // 2]
    with open(os.path.join(out, "model_0000004.pth"), "wb") as f:
        f.write(half)
    with open(os.path.join(out, "last_checkpoint"), "w") as f:
        f.write("model_0000004.pth")
    log = _train(out, "--resume", "SOLVER.MAX_ITER", 6, "SOLVER.CHECKPOINT_PERIOD", 3)
    assert "RESUMING FROM AN OLDER CHECKPOINT" in log and "model_0000004.pth" in log
    assert "Starting training from iteration 3" in log
    ckpt = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == 5
    # the queue pointer kept counting from the checkpoint: 6 iterations x 8 keys in total
    assert int(ckpt["model"]["queue.ptr"]) == (6 * 8) % 64
    resumed = {r["iteration"]: r for r in _metrics(out)}
    full = {r["iteration"]: r for r in _metrics(full_out)}
    assert min(resumed) >= 3
    for it in resumed:  # same cosine schedule as the uninterrupted run
        if "lr" in resumed[it] and it in full and "lr" in full[it]:
            assert resumed[it]["lr"] == pytest.approx(full[it]["lr"])


@pytest.mark.slow
def test_two_processes_gloo(tmp_path):
    out = str(tmp_path)
    log = _train(out, "--num-gpus", "2", "SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 100)
    assert "world size: 2" in log.lower() or "Rank of current process: 0. World size: 2" in log
    assert "Warning" not in log  # e.g. DDP's broadcast_buffers deprecation, in every process
    ckpt = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)
    # keys of both ranks (4 each per step) were enqueued on every step
    assert int(ckpt["model"]["queue.ptr"]) == (4 * 8) % 64


@pytest.mark.slow
def test_an_error_on_two_processes_ends_with_the_real_error(tmp_path):
    """A NaN loss (detected on rank 0) while rank 1 goes on to the next step's collectives:
    the run must end promptly with the FloatingPointError, not a collective mismatch."""
    out = str(tmp_path)
    proc = run_train_net(
        "--config-file",
        CONFIG,
        "--num-gpus",
        "2",
        "OUTPUT_DIR",
        out,
        "SOLVER.MAX_ITER",
        20,
        "SOLVER.BASE_LR",
        1e12,
        "SOLVER.WARMUP_ITERS",
        0,
        timeout=300,
    )
    assert proc.returncode != 0
    for text in (proc.stderr, open(os.path.join(out, "log.txt")).read()):
        assert "FloatingPointError: Loss became infinite or NaN" in text
    assert "mismatch" not in proc.stderr.lower() and "SIGABRT" not in proc.stderr
