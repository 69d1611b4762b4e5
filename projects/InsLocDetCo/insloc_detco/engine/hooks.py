"""Training hooks of the pretraining engine."""
import json
import logging
import os

from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

__all__ = ["SkippedImagesHook", "PlotCurvesHook", "plot_metrics"]

logger = logging.getLogger(__name__)


class SkippedImagesHook(HookBase):
    """Sum the images skipped as unreadable over all ranks and log them every ``period``."""

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
        if (self.trainer.iter + 1) % self._period == 0:
            self._report()

    def after_train(self):
        self._report()


def plot_metrics(metrics_file: str, out_file: str) -> bool:
    """
    Plot every ``loss*`` and ``[metric]acc/*`` series of a detectron2 ``metrics.json`` against
    the iteration. Returns False if there is nothing to plot yet.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with PathManager.open(metrics_file) as f:
        records = [json.loads(line) for line in f if line.strip()]
    series = {}
    for r in records:
        for k, v in r.items():
            if k.startswith("loss") or k.startswith("total_loss") or k.startswith("[metric]acc/"):
                series.setdefault(k, []).append((r["iteration"], v))
    if not series:
        return False
    losses = sorted(k for k in series if "loss" in k)
    accs = sorted(k for k in series if k.startswith("[metric]acc/"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, keys, title in ((axes[0], losses, "loss"), (axes[1], accs, "contrastive top-1 (%)")):
        for k in keys:
            it, val = zip(*series[k])
            ax.plot(it, val, label=k.replace("[metric]acc/", ""), linewidth=1.2)
        ax.set_xlabel("iteration")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if keys:
            ax.legend(fontsize=7, ncol=2)
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(metrics_file))))
    fig.tight_layout()
    with PathManager.open(out_file, "wb") as f:
        fig.savefig(f, dpi=100)
    plt.close(fig)
    return True


class PlotCurvesHook(HookBase):
    """Write ``curves.png`` from ``metrics.json`` every ``period`` iterations and at the end."""

    def __init__(self, output_dir: str, period: int):
        self._metrics = os.path.join(output_dir, "metrics.json")
        self._out = os.path.join(output_dir, "curves.png")
        self._period = period

    def _plot(self):
        if not PathManager.exists(self._metrics):
            return
        try:
            if plot_metrics(self._metrics, self._out):
                logger.info(f"Wrote training curves to {self._out}")
        except Exception as e:  # a plot must never kill a training run
            logger.warning(f"Could not plot {self._metrics}: {e}")

    def after_step(self):
        if self._period > 0 and (self.trainer.iter + 1) % self._period == 0:
            self._plot()

    def after_train(self):
        self._plot()
