"""DeviceMetricsTrainer: losses stay on the device and are read back only when flushed."""

import math

import pytest
import torch
from detectron2.utils.events import EventStorage
from torch import nn

from insloc_detco.engine.step import DeviceMetricsTrainer


class ScriptedLosses(nn.Module):
    """Returns the scripted loss values (times a weight of 1) one step after the other."""

    def __init__(self, values):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.values = iter(values)

    def forward(self, data):
        v = next(self.values)
        return {"loss_a": self.weight * v, "loss_b": self.weight * 0.0 + 1.0}


def run(values, flush_periods, max_iter):
    model = ScriptedLosses(values)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    step = DeviceMetricsTrainer(
        model, [None] * max_iter, optimizer, flush_periods=flush_periods, max_iter=max_iter
    )
    reads = []
    with EventStorage(0) as storage:
        step.storage = storage
        original = step.flush_metrics
        step.flush_metrics = lambda: (reads.append(step.iter), original())
        for i in range(max_iter):
            storage.iter = step.iter = i
            step.run_step()
    return storage, reads


def test_losses_are_read_back_only_at_flushes_as_means():
    storage, reads = run([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], flush_periods=(3, 0), max_iter=7)
    assert reads == [2, 5, 6]  # every 3 iterations, and the last one
    total = storage.history("total_loss").values()
    loss_a = storage.history("loss_a").values()
    assert [it for _, it in total] == [2, 5, 6]
    assert [v for v, _ in loss_a] == pytest.approx([2.0, 5.0, 7.0])  # means of 1-3, 4-6, 7
    assert [v for v, _ in total] == pytest.approx([3.0, 6.0, 8.0])
    assert len(storage.history("data_time").values()) == 7  # host timing: every step


def test_a_nan_loss_is_caught_at_the_next_flush_before_a_checkpoint():
    # Logs every 10, checkpoints every 4: the NaN of iteration 1 is caught at iteration 3.
    with pytest.raises(FloatingPointError, match=r"\[0, 3\]"):
        run([1.0, math.nan, 1.0, 1.0, 1.0], flush_periods=(10, 4), max_iter=5)
