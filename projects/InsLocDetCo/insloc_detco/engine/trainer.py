"""The pretraining trainer: detectron2's ``DefaultTrainer`` with an unlabeled data loader."""

import inspect
import logging
import math
import os
import weakref
from collections import OrderedDict

import torch
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.modeling import build_model
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import (
    PeriodicCheckpointer,
    SafeDetectionCheckpointer,
    describe_checkpoint_disk_use,
    estimate_checkpoint_bytes,
)
from ..checkpoint.periodic import DEFAULT_MAX_TO_KEEP
from ..data import build_pretrain_train_loader, get_pretrain_dataset_dicts
from ..modeling.contrastive import ContrastiveQueue, broadcast_queues
from ..modeling.meta_arch.base import channels_last_from_config
from .fast_path import build_fused_sgd, enable_fast_path, fast_path_enabled, uses_cuda_graphs
from .hooks import PlotCurvesHook, SkippedImagesHook
from .preemption import PreemptionHook
from .resume import RunStateHook
from .step import DeviceMetricsTrainer
from .summary import describe_model, describe_schedule
from .threads import configure_threads
from .watchdog import ProgressHook

__all__ = [
    "DeviceAgnosticTrainer",
    "PretrainTrainer",
    "create_ddp_model_any_device",
    "resolve_epochs",
    "resolve_device",
    "resolve_config_file",
]

logger = logging.getLogger(__name__)

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs")


class DeviceAgnosticTrainer(DefaultTrainer):
    """
    ``DefaultTrainer`` whose DDP wrapper also works for CPU models (several gloo processes),
    where detectron2 would pass a CUDA device id; with checkpoints that are verified, resumed
    past damage and pruned (``insloc_detco.checkpoint``), a start-up summary (model, schedule,
    checkpoint disk use), and no evaluation after a failure. Used for pretraining and
    fine-tuning.
    """

    def __init__(self, cfg):
        # DefaultTrainer.__init__, with create_ddp_model_any_device.
        TrainerBase.__init__(self)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda"):
            raise ValueError("SOLVER.AMP.ENABLED needs MODEL.DEVICE cuda; disable AMP on CPU.")
        configure_threads(cfg)
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model_any_device(model, broadcast_buffers=False)
        self._trainer = self.build_step_trainer(cfg, model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        # Never runs code from MODEL.WEIGHTS or a resumed checkpoint (detectron2 unpickles .pkl).
        self.checkpointer = SafeDetectionCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())
        logger.info(describe_schedule(cfg, comm.get_world_size()))
        if comm.is_main_process():
            size = estimate_checkpoint_bytes(self.checkpointer.model, optimizer)
            logger.info(
                describe_checkpoint_disk_use(
                    size,
                    cfg.SOLVER.CHECKPOINT_PERIOD,
                    self.max_iter,
                    _max_to_keep(cfg),
                    cfg.OUTPUT_DIR,
                )
            )

    @classmethod
    def build_step_trainer(cls, cfg, model, data_loader, optimizer) -> SimpleTrainer:
        """What runs one iteration: :func:`build_step_trainer`."""
        return build_step_trainer(cfg, model, data_loader, optimizer)

    @classmethod
    def build_model(cls, cfg):
        """
        detectron2's ``build_model``; the log names the momentum encoder instead of printing
        the model twice, and contrastive queues start identical on every rank, as DDP makes
        the parameters (whether DDP also syncs buffers depends on the torch version).
        """
        model = build_model(cfg)
        logger.info(describe_model(model))
        broadcast_queues(model)
        return model

    def build_hooks(self):
        """detectron2's hooks, with :meth:`build_checkpoint_hook` as the periodic checkpointer,
        and :meth:`build_cluster_hooks`."""
        return [
            self.build_checkpoint_hook() if type(h) is hooks.PeriodicCheckpointer else h
            for h in super().build_hooks()
        ] + self.build_cluster_hooks()

    def build_cluster_hooks(self):
        """Step counting for the lost-rank watchdog and save-then-exit on preemption signals
        (after the periodic checkpointer; the ranks agree every ``SOLVER.LOG_PERIOD``
        iterations, where the losses are read back anyway). Transfer configs are detectron2's,
        without that key: they agree every 20 iterations, the period of detectron2's writers."""
        solver = self.cfg.SOLVER
        agree_period = solver.get("LOG_PERIOD", 20)
        preemption = PreemptionHook(self.checkpointer, solver.CHECKPOINT_PERIOD, agree_period)
        return [ProgressHook(), preemption]

    def build_checkpoint_hook(self):
        """Periodic checkpoints, the newest ``SOLVER.CHECKPOINT_MAX_TO_KEEP`` kept, and
        ``model_final.pth`` (not also ``model_<last>.pth``)."""
        return PeriodicCheckpointer(
            self.checkpointer, self.cfg.SOLVER.CHECKPOINT_PERIOD, max_to_keep=_max_to_keep(self.cfg)
        )

    def after_train(self):
        """
        After an exception (``iter < max_iter``, detectron2's convention) no evaluation: it runs
        collectives that the other ranks, gone or stuck in the step, cannot join (detectron2's
        ``EvalHook`` also evaluates after a failure in the last iteration). The other hooks run.
        """
        if self.iter >= self.max_iter:
            return super().after_train()
        self.storage.iter = self.iter
        for h in self._hooks:
            if not isinstance(h, hooks.EvalHook):
                h.after_train()


class PretrainTrainer(DeviceAgnosticTrainer):
    """
    Self-supervised pretraining with detectron2's loop: SGD + ``WarmupCosineLR`` from the
    config, ``REFERENCE_WORLD_SIZE`` scaling, AMP, DDP, periodic checkpoints with
    ``resume_or_load``, and detectron2's console / ``metrics.json`` / TensorBoard writers.
    There is no evaluation during pretraining: transfer is measured by ``eval_transfer.py``.
    """

    @classmethod
    def build_model(cls, cfg):
        """The model in NHWC on CUDA (``MODEL.CHANNELS_LAST``), compiled on the fast path."""
        model = super().build_model(cfg)
        if channels_last_from_config(cfg):
            model = model.to(memory_format=torch.channels_last)
        return enable_fast_path(model, cfg)

    @classmethod
    def build_optimizer(cls, cfg, model):
        """detectron2's SGD; fused into one kernel on the fast path."""
        if fast_path_enabled(cfg):
            return build_fused_sgd(cfg, model)
        return super().build_optimizer(cfg, model)

    @classmethod
    def build_step_trainer(cls, cfg, model, data_loader, optimizer) -> DeviceMetricsTrainer:
        """
        The step with the losses kept on the device (read back every ``SOLVER.LOG_PERIOD``
        iterations, before checkpoints and at the end), eager or fast path alike.
        """
        amp = cfg.SOLVER.AMP.ENABLED
        dtype = amp_dtype(cfg) if amp else None
        scaler = _grad_scaler(dtype) if amp else None
        return DeviceMetricsTrainer(
            model,
            data_loader,
            optimizer,
            flush_periods=(cfg.SOLVER.LOG_PERIOD, cfg.SOLVER.CHECKPOINT_PERIOD),
            max_iter=cfg.SOLVER.MAX_ITER,
            amp_dtype=dtype,
            grad_scaler=scaler,
            cuda_graphs=uses_cuda_graphs(cfg),
        )

    @classmethod
    def build_train_loader(cls, cfg):
        return build_pretrain_train_loader(cfg)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        return OrderedDict()

    def resume_or_load(self, resume=True, *, require_same_config=False):
        """
        As detectron2's; with ``require_same_config`` a checkpoint found in ``OUTPUT_DIR`` is
        resumed only if it was written with this config (:class:`RunStateHook`).
        """
        self._run_state.require_same_config = require_same_config
        super().resume_or_load(resume)
        if resume and self.checkpointer.has_checkpoint() and self._run_state.resumed_config is None:
            self._run_state.check_config(None)

    def build_hooks(self):
        cfg = self.cfg
        self._run_state = RunStateHook(getattr(self.data_loader, "sampler", None), cfg.dump())
        ret = [self._run_state, hooks.IterationTimer(), hooks.LRScheduler()]
        ret.append(SkippedImagesHook(self.data_loader, cfg.SOLVER.LOG_PERIOD))
        if comm.is_main_process():
            ret.append(self.build_checkpoint_hook())
            ret.append(hooks.PeriodicWriter(self.build_writers(), period=cfg.SOLVER.LOG_PERIOD))
            if cfg.SOLVER.PLOT_CURVES:
                sizes = [m.size for m in self.model.modules() if isinstance(m, ContrastiveQueue)]
                ret.append(PlotCurvesHook(cfg.OUTPUT_DIR, cfg.SOLVER.CHECKPOINT_PERIOD, sizes))
        return ret + self.build_cluster_hooks()


def amp_dtype(cfg) -> torch.dtype:
    """The autocast dtype of ``SOLVER.AMP.PRECISION`` (float16 for configs without the key)."""
    name = cfg.SOLVER.AMP.get("PRECISION", "float16")
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in ("bfloat16", "float16"):
        raise ValueError(f"SOLVER.AMP.PRECISION must be auto, bfloat16 or float16, not {name}")
    return getattr(torch, name)


def build_step_trainer(cfg, model, data_loader, optimizer) -> SimpleTrainer:
    """
    detectron2's ``SimpleTrainer``, or its ``AMPTrainer`` with ``SOLVER.AMP.ENABLED``. In
    bfloat16 the loss needs no scaling: the GradScaler is disabled, which also removes its
    per-step overflow check (a GPU synchronisation).
    """
    if not cfg.SOLVER.AMP.ENABLED:
        return SimpleTrainer(model, data_loader, optimizer)
    dtype = amp_dtype(cfg)
    return AMPTrainer(
        model, data_loader, optimizer, grad_scaler=_grad_scaler(dtype), precision=dtype
    )


def _grad_scaler(dtype: torch.dtype) -> torch.amp.GradScaler:
    """Loss scaling for float16 only: bfloat16 needs none (and the scaler's check would
    synchronise every step)."""
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    logger.info(f"AMP: autocast to {dtype}, loss scaling {'on' if scaler.is_enabled() else 'off'}.")
    return scaler


def create_ddp_model_any_device(model, **kwargs):
    """
    detectron2's ``create_ddp_model``, with no device id for a CPU model and the current CUDA
    device for a GPU model (detectron2 passes the local rank, which is not the device index when
    a scheduler shows each process only its own GPU). Where torch has
    ``forward_sync_buffers`` (2.13+, which deprecates ``broadcast_buffers`` with a warning in
    every process), ``broadcast_buffers=False`` is passed as ``forward_sync_buffers=False``:
    no buffer broadcast at each forward either, buffers synced once when wrapping.
    """
    device = next(model.parameters()).device
    if comm.get_world_size() > 1 and device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    elif comm.get_world_size() > 1 and device.type == "cuda":  # not always cuda:LOCAL_RANK
        kwargs.setdefault("device_ids", [torch.cuda.current_device()])
    ddp_args = inspect.signature(DistributedDataParallel.__init__).parameters
    if "broadcast_buffers" in kwargs and "forward_sync_buffers" in ddp_args:
        kwargs["forward_sync_buffers"] = kwargs.pop("broadcast_buffers")
    return create_ddp_model(model, **kwargs)


def _max_to_keep(cfg) -> int:
    # The transfer configs have detectron2's keys only: they get the default.
    return cfg.SOLVER.get("CHECKPOINT_MAX_TO_KEEP", DEFAULT_MAX_TO_KEEP)


def resolve_epochs(cfg):
    """If ``SOLVER.EPOCHS`` > 0, set ``SOLVER.MAX_ITER`` from the training set size (in place)."""
    if cfg.SOLVER.EPOCHS <= 0:
        return cfg
    num_images = len(get_pretrain_dataset_dicts(cfg.DATASETS.TRAIN))
    cfg.SOLVER.MAX_ITER = math.ceil(cfg.SOLVER.EPOCHS * num_images / cfg.SOLVER.IMS_PER_BATCH)
    logger.info(
        f"SOLVER.EPOCHS={cfg.SOLVER.EPOCHS} over {num_images} images at batch "
        f"{cfg.SOLVER.IMS_PER_BATCH}: MAX_ITER={cfg.SOLVER.MAX_ITER}"
    )
    return cfg


def resolve_device(cfg):
    """Fall back to the CPU (in place) when the config asks for CUDA on a machine without it."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("CUDA is not available: training on the CPU (MODEL.DEVICE=cpu).")
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def resolve_config_file(path: str) -> str:
    """A path as given, else a name relative to the project's ``configs/`` folder."""
    if os.path.isfile(path):
        return path
    candidate = os.path.join(_CONFIG_DIR, path)
    if os.path.isfile(candidate):
        return candidate
    raise FileNotFoundError(
        f"Config '{path}' not found, neither as a path nor under {_CONFIG_DIR}."
    )
