"""The training step of the pretraining loop, with the losses left on the device between logs.

detectron2's ``SimpleTrainer`` and ``AMPTrainer`` read every loss back to the host at every step
(``write_metrics``: ``.item()``, a ``comm.gather`` of Python dicts and an ``isfinite`` check),
which waits for the GPU to finish the step before the host may queue the next one.
:class:`DeviceMetricsTrainer` runs the same step and keeps a running sum of the losses on the
device; the sums are read back (one transfer, one ``all_reduce`` across ranks) only when they are
logged, before a checkpoint and at the last iteration, where the non-finite-loss check runs.
"""

import math
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

__all__ = ["DeviceMetricsTrainer"]


class DeviceMetricsTrainer(SimpleTrainer):
    """
    One training step: forward (under autocast with AMP), backward (loss-scaled with a
    GradScaler), SGD. What it records in the event storage:

    * every step: ``data_time`` of this rank (detectron2 records the maximum over ranks,
      which needs a collective per step);
    * at every flush iteration: the losses and ``total_loss`` averaged over the iterations
      since the last flush and over the ranks (detectron2: the last iteration's).
    """

    def __init__(
        self,
        model,
        data_loader,
        optimizer,
        *,
        flush_periods: Sequence[int] = (1,),
        max_iter: int = 0,
        amp_dtype: Optional[torch.dtype] = None,
        grad_scaler: Optional[torch.amp.GradScaler] = None,
        cuda_graphs: bool = False,
    ):
        """
        Args:
            model, data_loader, optimizer: as for ``SimpleTrainer``.
            flush_periods: read the losses back after every iteration ``i`` with
                ``(i + 1) % p == 0`` for one of these ``p`` (e.g. ``SOLVER.LOG_PERIOD`` and
                ``SOLVER.CHECKPOINT_PERIOD``: no checkpoint is written after a non-finite loss
                that was not checked), and after iteration ``max_iter - 1``.
            amp_dtype: autocast dtype (AMP), or None (no autocast).
            grad_scaler: scales the loss (float16 AMP); None or disabled: no scaling.
            cuda_graphs: the compiled encoders are CUDA graphs: mark each step's start so that
                their replay may reuse the last step's memory.
        """
        super().__init__(model, data_loader, optimizer)
        self.flush_periods = [p for p in flush_periods if p > 0]
        self.max_iter = max_iter
        self.amp_dtype = amp_dtype
        self.grad_scaler = grad_scaler
        self.cuda_graphs = cuda_graphs
        self.device_type = next(model.parameters()).device.type
        self._names: List[str] = []
        self._sums: Optional[torch.Tensor] = None
        self._count = 0

    def run_step(self):
        assert self.model.training, "[DeviceMetricsTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        amp = self.amp_dtype is not None
        with torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=amp):
            loss_dict = self.model(data)
            losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        scaler = self.grad_scaler
        (scaler.scale(losses) if scaler is not None else losses).backward()
        self.after_backward()
        get_event_storage().put_scalar("data_time", data_time)
        self.accumulate(loss_dict)
        if self.should_flush():
            self.flush_metrics()
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()

    def accumulate(self, loss_dict: Dict[str, torch.Tensor]):
        """Add this step's losses to the running sums, on the device (two small kernels)."""
        values = torch.stack(list(loss_dict.values())).detach().float()
        if self._sums is None:
            self._names, self._sums = list(loss_dict), values
        else:
            self._sums = self._sums + values
        self._count += 1

    def should_flush(self) -> bool:
        it = self.iter + 1
        return it == self.max_iter or any(it % p == 0 for p in self.flush_periods)

    def flush_metrics(self):
        """
        Read the mean losses since the last flush back to the host, check them, and record
        them on the main process. Every rank flushes at the same iterations (a collective).

        Raises:
            FloatingPointError: a loss was infinite or NaN at one of those iterations.
        """
        if self._sums is None:
            return
        means = self._sums / self._count
        if comm.get_world_size() > 1:
            dist.all_reduce(means)
            means = means / comm.get_world_size()
        metrics = dict(zip(self._names, means.tolist()))  # the one read-back
        first = self.iter - self._count + 1
        self._sums, self._count = None, 0
        total = sum(metrics.values())
        if not math.isfinite(total):
            raise FloatingPointError(
                f"Loss became infinite or NaN at an iteration in [{first}, {self.iter}] "
                f"(losses are read back every SOLVER.LOG_PERIOD iterations and before "
                f"checkpoints)!\nmean loss_dict = {metrics}"
            )
        if comm.is_main_process():
            storage = get_event_storage()
            storage.put_scalar("total_loss", total)
            if len(metrics) > 1:
                storage.put_scalars(**metrics)

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
