"""Training hooks: skipped-image counts without collectives after a failure, metrics, curves."""

import json
import math

import matplotlib.axes
import pytest
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

from insloc_detco.engine import SkippedImagesHook, plot_metrics, read_metrics


class _Loader:
    num_skipped = 3


class _Trainer:
    def __init__(self, iteration, max_iter, storage):
        self.iter, self.max_iter, self.storage = iteration, max_iter, storage


def _hook(iteration, max_iter, storage, period=5):
    hook = SkippedImagesHook(_Loader(), period)
    hook.trainer = _Trainer(iteration, max_iter, storage)
    return hook


def _no_collectives(monkeypatch):
    def collective(*args, **kwargs):
        raise AssertionError("a collective ran")

    monkeypatch.setattr(comm, "all_gather", collective)


@pytest.mark.parametrize("failed_at", [0, 4, 9])
def test_skipped_images_after_a_failure_runs_no_collective(monkeypatch, caplog, failed_at):
    """An exception on one rank: the others are not in after_train to answer a collective."""
    _no_collectives(monkeypatch)
    with EventStorage(0) as storage:
        _hook(failed_at, 10, storage).after_train()  # iter < max_iter: training failed
    assert "3 unreadable images were skipped on rank 0" in caplog.text


def test_skipped_images_reported_at_the_last_iteration_not_after(monkeypatch):
    with EventStorage(0) as storage:
        storage.iter = 9
        _hook(9, 10, storage, period=4).after_step()  # last iteration, not a period boundary
        assert storage.history("data/skipped_images").latest() == 3
        _no_collectives(monkeypatch)
        storage.iter = 10
        _hook(10, 10, storage).after_train()  # success: nothing recorded at iteration 10
        assert max(it for _, it in storage.history("data/skipped_images").values()) == 9


def _write(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((json.dumps(r) if isinstance(r, dict) else r) + "\n")


def test_metrics_after_a_resume_keep_one_record_per_iteration(tmp_path):
    path = str(tmp_path / "metrics.json")
    first = [{"iteration": i, "total_loss": 1.0} for i in (4, 9, 14, 19)]
    resumed = [{"iteration": i, "total_loss": 2.0} for i in (14, 19, 24)]  # from checkpoint 9
    _write(path, first + ['{"iteration": 22, "total_lo'] + resumed)  # a line cut by a crash
    records = read_metrics(path)
    assert [r["iteration"] for r in records] == [4, 9, 14, 19, 24]
    assert [r["total_loss"] for r in records] == [1.0, 1.0, 2.0, 2.0, 2.0]


def test_resume_from_an_earlier_checkpoint_drops_the_abandoned_tail(tmp_path):
    path = str(tmp_path / "metrics.json")
    _write(
        path,
        [{"iteration": i, "total_loss": 1.0} for i in (4, 9, 14, 19)]
        + [{"iteration": 9, "total_loss": 2.0}],
    )
    assert [(r["iteration"], r["total_loss"]) for r in read_metrics(path)] == [(4, 1.0), (9, 2.0)]


def test_curves_are_one_line_per_series_with_chance_levels(tmp_path, monkeypatch):
    path = str(tmp_path / "metrics.json")
    rec = lambda i, v: {
        "iteration": i,
        "total_loss": 2 * v,
        "loss_insloc_p2": v,  # noqa: E731
        "loss_insloc_p3": v,
        "[metric]acc/insloc_p2": 10.0,
    }
    _write(path, [rec(i, 1.0) for i in (1, 3, 5)] + [rec(i, 2.0) for i in (3, 5, 7)])
    lines, hlines = {}, []
    plot = matplotlib.axes.Axes.plot
    axhline = matplotlib.axes.Axes.axhline

    def record_plot(self, x, y, *args, label=None, **kwargs):
        lines[label] = list(x)
        return plot(self, x, y, *args, label=label, **kwargs)

    def record_axhline(self, y=0, *args, label=None, **kwargs):
        hlines.append((y, label))
        return axhline(self, y, *args, label=label, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", record_plot)
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", record_axhline)
    assert plot_metrics(path, str(tmp_path / "curves.png"), queue_sizes=[256, 256, 64])
    assert (tmp_path / "curves.png").stat().st_size > 0
    for name in ("total_loss", "loss_insloc_p2", "insloc_p2"):
        assert lines[name] == [1, 3, 5, 7], name  # no loop back after the resume
    assert sorted(round(y, 4) for y, _ in hlines) == [
        round(math.log(65), 4),
        round(math.log(257), 4),
    ]
    assert all("chance: ln(K+1)" in label for _, label in hlines)
