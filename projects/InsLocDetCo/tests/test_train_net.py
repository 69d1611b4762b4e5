"""The README's pretraining commands, end to end at instant scale (CPU)."""
import json
import os
import shutil

import pytest
import torch
from utils import run_train_net

CONFIG = "instant_test/pretrain_moco_v2.yaml"


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _train(out, *extra):
    proc = run_train_net("--config-file", CONFIG, *extra, "OUTPUT_DIR", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("moco1"))
    log = _train(out, "--num-gpus", "1", "SOLVER.MAX_ITER", 6, "SOLVER.CHECKPOINT_PERIOD", 3)
    return out, log


def test_single_process_run_writes_checkpoints_logs_and_curves(single_run):
    out, log = single_run
    for f in ("model_final.pth", "model_0000002.pth", "metrics.json", "curves.png",
              "config.yaml", "last_checkpoint"):
        assert os.path.exists(os.path.join(out, f)), f
    assert "[metric]acc/moco" in log and "eta:" in log and "lr:" in log
    ckpt = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == 5
    assert int(ckpt["model"]["queue.ptr"]) == (6 * 8) % 64
    assert any(k.startswith("encoder_k.") for k in ckpt["model"])
    records = _metrics(out)
    assert all(r["total_loss"] == r["total_loss"] for r in records if "total_loss" in r)  # finite
    assert any("[metric]acc/moco" in r for r in records)


def test_resume_continues_schedule_queue_and_momentum_encoder(single_run, tmp_path):
    full_out, _ = single_run
    out = str(tmp_path)
    # Pretend the run was interrupted after the checkpoint of iteration 2.
    shutil.copy(os.path.join(full_out, "model_0000002.pth"), out)
    with open(os.path.join(out, "last_checkpoint"), "w") as f:
        f.write("model_0000002.pth")
    log = _train(out, "--resume", "SOLVER.MAX_ITER", 6, "SOLVER.CHECKPOINT_PERIOD", 3)
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


def test_two_processes_gloo(tmp_path):
    out = str(tmp_path)
    log = _train(out, "--num-gpus", "2", "SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 100)
    assert "world size: 2" in log.lower() or "Rank of current process: 0. World size: 2" in log
    ckpt = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)
    # keys of both ranks (4 each per step) were enqueued on every step
    assert int(ckpt["model"]["queue.ptr"]) == (4 * 8) % 64
