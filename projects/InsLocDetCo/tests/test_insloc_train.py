"""InsLoc end to end through ``train_net.py``: FPN on 2 gloo processes, C4 on one process with
in-batch backgrounds (collated in the loader worker)."""

import json
import math
import os

import pytest
import torch
from insloc_testing import run_train_net

ITERS, BATCH, QUEUE = 4, 8, 64  # instant-test batch and queue


def train(out, config, *extra):
    proc = run_train_net(
        "--config-file",
        config,
        *extra,
        "SOLVER.MAX_ITER",
        ITERS,
        "SOLVER.CHECKPOINT_PERIOD",
        100,
        "SOLVER.LOG_PERIOD",
        1,
        "OUTPUT_DIR",
        out,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    ckpt = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)
    return metrics, ckpt["model"]


def check_levels(metrics, state, levels):
    last = [m for m in metrics if "total_loss" in m][-1]
    assert last["iteration"] == ITERS - 1
    assert math.isfinite(last["total_loss"])
    for f in levels:
        # detectron2 logs the separate losses only when there are several.
        assert len(levels) == 1 or math.isfinite(last[f"loss_insloc_{f}"]), last
        assert f"[metric]acc/insloc_{f}" in last, last  # per-level contrastive accuracy
        # Every level's queue holds all ranks' keys: ITERS global batches.
        assert int(state[f"queues.{f}.ptr"]) == ITERS * BATCH % QUEUE
    assert not any(k.startswith("box_aug.") for k in state), "anchors are not checkpointed"


@pytest.mark.slow
def test_fpn_two_processes(tmp_path):
    metrics, state = train(str(tmp_path), "instant_test/pretrain_insloc_fpn.yaml", "--num-gpus", 2)
    levels = ["p2", "p3", "p4", "p5"]
    check_levels(metrics, state, levels)
    newest = {f: state[f"queues.{f}.keys"][: ITERS * BATCH] for f in levels}
    assert not torch.allclose(newest["p2"], newest["p5"])


@pytest.mark.slow
def test_c4_one_process_batch_backgrounds(tmp_path):
    metrics, state = train(
        str(tmp_path),
        "instant_test/pretrain_insloc_c4.yaml",
        "--num-gpus",
        1,
        "INPUT.PRETRAIN.COPY_PASTE.BACKGROUND",
        "batch",
    )
    check_levels(metrics, state, ["res4"])
    assert "encoder_q.res5.0.conv1.weight" in state
