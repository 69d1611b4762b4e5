"""Periodic checkpoints that keep only the newest few, and what they cost on disk.

detectron2's ``PeriodicCheckpointer`` keeps every checkpoint by default: a 200-epoch DetCo run
(1.2 GB per checkpoint, one per epoch) would fill 240 GB. Its ``max_to_keep`` remembers only the
files written by the current process, so each ``--resume`` would leave the older ones behind
for good; this hook prunes by looking at the folder instead. It also writes the last iteration
once, as ``model_final.pth``, where detectron2 writes ``model_<last>.pth`` as well when
``MAX_ITER`` is a multiple of the period (the same weights twice).
"""

import logging
import re
import shutil

import torch
from detectron2.engine import hooks

from .checkpointer import SafeDetectionCheckpointer

__all__ = [
    "DEFAULT_MAX_TO_KEEP",
    "PeriodicCheckpointer",
    "estimate_checkpoint_bytes",
    "describe_checkpoint_disk_use",
]

logger = logging.getLogger(__name__)

# Periodic checkpoints kept by default (configs without SOLVER.CHECKPOINT_MAX_TO_KEEP, e.g. the
# stock-key transfer configs).
DEFAULT_MAX_TO_KEEP = 3


class PeriodicCheckpointer(hooks.PeriodicCheckpointer):
    """
    Saves ``<prefix>_<iter>.pth`` every ``period`` iterations and ``<prefix>_final.pth`` after
    the last one, and deletes all but the ``max_to_keep`` newest periodic checkpoints (with
    their ``.sha256``) of the folder after each periodic save. Never deleted:
    ``<prefix>_final.pth``, the file ``last_checkpoint`` names, and files of other names.
    """

    def __init__(
        self,
        checkpointer: SafeDetectionCheckpointer,
        period: int,
        max_to_keep: int = DEFAULT_MAX_TO_KEEP,
        file_prefix: str = "model",
    ):
        """
        Args:
            max_to_keep: periodic checkpoints kept; 0 keeps them all.
        """
        # fvcore's own max_to_keep stays off: it forgets the files of earlier sessions.
        super().__init__(checkpointer, period, max_iter=None, file_prefix=file_prefix)
        if max_to_keep < 0:
            raise ValueError(f"max_to_keep must be >= 0 (0 keeps all), not {max_to_keep}.")
        self.keep = max_to_keep

    def step(self, iteration: int, **kwargs):
        iteration = int(iteration)
        state = {"iteration": iteration, **kwargs}
        if self.max_iter is not None and iteration >= self.max_iter - 1:
            self.checkpointer.save(f"{self.file_prefix}_final", **state)
        elif (iteration + 1) % self.period == 0:
            self.checkpointer.save(f"{self.file_prefix}_{iteration:07d}", **state)
            self.prune()

    def prune(self):
        """Delete the periodic checkpoints beyond the ``keep`` newest."""
        if self.keep == 0 or not self.checkpointer.save_to_disk:
            return
        periodic = re.compile(r"_\d{7}\.pth$")
        files = [f for f in self.checkpointer.checkpoint_files() if periodic.search(f)]
        last = self.checkpointer.get_checkpoint_file()
        for path in files[self.keep :]:
            if path != last:
                logger.info(f"Deleting {path} (SOLVER.CHECKPOINT_MAX_TO_KEEP={self.keep})")
                self.checkpointer.remove_checkpoint(path)


def estimate_checkpoint_bytes(model: torch.nn.Module, optimizer=None) -> int:
    """
    Size of a training checkpoint: the model's state dict (parameters and buffers: both
    encoders, queues) plus the optimizer's per-parameter state (SGD momentum: one tensor like
    each trained parameter; Adam: two).
    """
    tensors = {t.data_ptr(): t for t in model.state_dict().values() if torch.is_tensor(t)}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if optimizer is None:
        return total
    per_param = 0
    if isinstance(optimizer, torch.optim.SGD):
        per_param = int(any(g.get("momentum", 0) for g in optimizer.param_groups))
    elif isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        per_param = 2
    else:
        per_param = 2  # unknown optimizer: assume the larger
    trained = {
        p.data_ptr(): p for g in optimizer.param_groups for p in g["params"] if p.requires_grad
    }
    return total + per_param * sum(p.numel() * p.element_size() for p in trained.values())


def describe_checkpoint_disk_use(
    bytes_per_checkpoint: int, period: int, max_iter: int, max_to_keep: int, save_dir: str
) -> str:
    """
    One line for the start-up log: checkpoint size, how many are kept, the most they occupy at
    once, and the free space of ``save_dir`` (with a warning when they would not fit).
    """
    periodic = max(0, (max_iter - 1) // period) if period > 0 else 0
    kept = periodic if max_to_keep == 0 else min(periodic, max_to_keep)
    # A periodic save writes the new file before the oldest is deleted, and model_final.pth
    # joins the kept ones at the end: kept + 1 files at the peak either way.
    peak = (kept + 1) * bytes_per_checkpoint
    policy = "all kept" if max_to_keep == 0 else f"the newest {max_to_keep} kept"
    text = (
        f"Checkpoints: ~{_gb(bytes_per_checkpoint)} each, {periodic} periodic (every {period} "
        f"iterations; {policy}, SOLVER.CHECKPOINT_MAX_TO_KEEP) + model_final.pth: at most "
        f"~{_gb(peak)} in {save_dir}"
    )
    try:
        free = shutil.disk_usage(save_dir).free
    except OSError:
        return text + "."
    text += f" ({_gb(free)} free)."
    if peak > free:
        text += " NOT ENOUGH DISK SPACE: lower SOLVER.CHECKPOINT_MAX_TO_KEEP or free some."
    return text


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"
