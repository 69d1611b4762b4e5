"""Training hooks of the pretraining engine."""

import json
import logging
import math
import os
from typing import Dict, List, Sequence

from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

__all__ = ["SkippedImagesHook", "PlotCurvesHook", "plot_metrics", "read_metrics"]

logger = logging.getLogger(__name__)


class SkippedImagesHook(HookBase):
    """
    Sum the images skipped as unreadable over all ranks; log and record the sum every
    ``period`` iterations and at the last one.

    The sum is a collective, so it runs only inside the loop, where every rank takes part. After
    an exception on one rank the others are not there to answer: a collective in ``after_train``
    would hang, or abort with a collective mismatch that hides the real error.
    """

    def __init__(self, loader, period: int):
        self._loader = loader  # a SkipCountingLoader
        self._period = period
        self._reported = 0

    def _report(self):
        total = sum(comm.all_gather(self._loader.num_skipped))
        self.trainer.storage.put_scalar("data/skipped_images", total, smoothing_hint=False)
        if total > self._reported and comm.is_main_process():
            logger.warning(f"{total} unreadable images skipped so far (replaced by others).")
        self._reported = total

    def after_step(self):
        it = self.trainer.iter
        if (it + 1) % self._period == 0 or it == self.trainer.max_iter - 1:
            self._report()

    def after_train(self):
        failed = self.trainer.iter < self.trainer.max_iter  # detectron2's convention
        if failed and self._loader.num_skipped:
            logger.warning(
                f"{self._loader.num_skipped} unreadable images were skipped on rank "
                f"{comm.get_rank()} before training stopped."
            )


def read_metrics(metrics_file: str) -> List[Dict]:
    """
    The records of a detectron2 ``metrics.json``, one per iteration, in iteration order.

    After ``--resume`` the file holds the iterations between the checkpoint and the
    interruption twice: a record whose iteration is not after the previous one starts a new
    run, whose records replace the old ones from that iteration on. A line cut short by a crash
    is skipped.
    """
    timeline: Dict[int, Dict] = {}
    last = None
    with PathManager.open(metrics_file) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            it = record.get("iteration") if isinstance(record, dict) else None
            if not isinstance(it, int):
                continue
            if last is not None and it <= last:
                timeline = {i: r for i, r in timeline.items() if i < it}
            timeline[it] = record
            last = it
    return [timeline[i] for i in sorted(timeline)]


def plot_metrics(metrics_file: str, out_file: str, queue_sizes: Sequence[int] = ()) -> bool:
    """
    Plot the losses and the ``[metric]acc/*`` series of a detectron2 ``metrics.json`` against
    the iteration (one point per iteration, see :func:`read_metrics`).

    Args:
        queue_sizes: sizes K of the model's queues. The chance level ln(K+1) of each is drawn on
            the loss plot: an InfoNCE term whose embeddings carry no information (all K + 1
            logits equal) is ln(K+1). It starts below, because the queue starts as random
            keys, and rises towards ln(K+1) as the queue fills with real ones.
    Returns:
        False if there is nothing to plot yet.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for r in read_metrics(metrics_file):
        for k, v in r.items():
            if "loss" in k or k.startswith("[metric]acc/"):
                series.setdefault(k, []).append((r["iteration"], v))
    if not series:
        return False
    terms = sorted(k for k in series if k.startswith("loss"))
    accs = sorted(k for k in series if k.startswith("[metric]acc/"))
    total = ["total_loss"] if "total_loss" in series else []
    if len(terms) > 1:
        panels = [
            (total, "total_loss (sum of the weighted loss terms)", ()),
            (terms, "loss terms", queue_sizes),
        ]
    else:  # detectron2 records the terms only when there are several
        panels = [(terms or total, "loss", queue_sizes)]
    panels.append((accs, "contrastive top-1 (%)", ()))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    for ax, (keys, title, sizes) in zip(axes, panels):
        for k in keys:
            it, val = zip(*series[k])
            ax.plot(it, val, label=k.replace("[metric]acc/", ""), linewidth=1.2)
        for i, size in enumerate(sorted(set(sizes))):
            chance = math.log(size + 1)
            label = f"chance: ln(K+1) = {chance:.2f}, K = {size} (a term of weight w: w·ln(K+1))"
            style = ("--", ":", "-.")[i % 3]
            ax.axhline(chance, color="k", linestyle=style, linewidth=1, alpha=0.7, label=label)
        ax.set_xlabel("iteration")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if keys:
            ax.legend(fontsize=7, ncol=2 if len(keys) > 6 else 1)
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(metrics_file))))
    fig.tight_layout()
    with PathManager.open(out_file, "wb") as f:
        fig.savefig(f, dpi=100)
    plt.close(fig)
    return True


class PlotCurvesHook(HookBase):
    """
    Write ``curves.png`` from ``metrics.json`` every ``period`` iterations and at the end, with
    the chance level ln(K+1) of each of ``queue_sizes`` on the loss plot.
    """

    def __init__(self, output_dir: str, period: int, queue_sizes: Sequence[int] = ()):
        self._metrics = os.path.join(output_dir, "metrics.json")
        self._out = os.path.join(output_dir, "curves.png")
        self._period = period
        self._queue_sizes = tuple(queue_sizes)

    def _plot(self):
        if not PathManager.exists(self._metrics):
            return
        try:
            if plot_metrics(self._metrics, self._out, self._queue_sizes):
                logger.info(f"Wrote training curves to {self._out}")
        except Exception as e:  # a plot must never kill a training run
            logger.warning(f"Could not plot {self._metrics}: {e}")

    def after_step(self):
        it = self.trainer.iter
        if self._period > 0 and (it + 1) % self._period == 0 and it < self.trainer.max_iter - 1:
            self._plot()  # the last iteration is plotted by after_train

    def after_train(self):
        self._plot()
