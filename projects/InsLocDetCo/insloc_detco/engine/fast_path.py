"""The fast path of the training step (``MODEL.FAST_PATH``): compilation, CUDA graphs, fused SGD.

The step itself is one definition (fixed shapes, no host synchronisation: see
``ContrastivePretrainer`` and ``PhotometricAugmentation``); the fast path only changes how it is
executed. ``torch.compile`` turns the encoders (forward and backward) and the on-device
augmentation into a few fused kernels each; with ``mode="reduce-overhead"`` on CUDA, each
compiled graph is also captured once as a CUDA graph and replayed with one launch. SGD runs as
one fused kernel over all parameters. The random draws stay outside the compiled graphs, so the
eager and the fast path see the same random numbers (``tests/test_fast_path.py``).
"""

import logging
from typing import Dict

import torch
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

__all__ = [
    "FAST_PATH_CHOICES",
    "fast_path_enabled",
    "compile_options",
    "uses_cuda_graphs",
    "enable_fast_path",
    "build_fused_sgd",
]

logger = logging.getLogger(__name__)

FAST_PATH_CHOICES = ("auto", "on", "off")
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def fast_path_enabled(cfg) -> bool:
    """Whether ``MODEL.FAST_PATH.ENABLED`` turns the fast path on for ``MODEL.DEVICE``."""
    choice = str(cfg.MODEL.FAST_PATH.ENABLED).lower()
    if choice not in FAST_PATH_CHOICES:
        raise ValueError(
            f"MODEL.FAST_PATH.ENABLED must be one of {FAST_PATH_CHOICES}, got {choice!r}"
        )
    if choice == "auto":
        return cfg.MODEL.DEVICE.startswith("cuda")
    return choice == "on"


def compile_options(cfg) -> Dict:
    """
    Keyword arguments of ``torch.compile`` for ``MODEL.FAST_PATH``. ``fullgraph=True``: a
    graph break (what a host synchronisation or a data-dependent shape causes) is an error, not
    a silent fall-back to Python.
    """
    f = cfg.MODEL.FAST_PATH
    mode = f.COMPILE_MODE
    if mode == "auto":
        mode = "reduce-overhead" if cfg.MODEL.DEVICE.startswith("cuda") else "default"
    if f.BACKEND != "inductor":  # modes are inductor's
        return {"backend": f.BACKEND, "fullgraph": True}
    return {"backend": "inductor", "mode": mode, "fullgraph": True}


def uses_cuda_graphs(cfg) -> bool:
    """Whether the fast path of ``cfg`` captures its compiled graphs as CUDA graphs."""
    mode = compile_options(cfg).get("mode")
    return (
        fast_path_enabled(cfg) and cfg.MODEL.DEVICE.startswith("cuda") and mode in _CUDA_GRAPH_MODES
    )


def enable_fast_path(model: torch.nn.Module, cfg) -> torch.nn.Module:
    """
    Compile ``model``'s hot path in place (``ContrastivePretrainer.compile_step``), if
    ``cfg`` enables the fast path; parameter names and checkpoints are unchanged. Returns the
    model.
    """
    if not fast_path_enabled(cfg):
        return model
    options = compile_options(cfg)
    logger.info(f"Fast path: torch.compile({options}) of the encoders and the augmentation.")
    model.compile_step(**options)
    return model


def build_fused_sgd(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """
    detectron2's ``build_optimizer`` (the same parameter groups, lr, momentum, Nesterov,
    weight decay, gradient clipping) with ``fused=True``: one kernel updates every parameter
    (detectron2 uses ``foreach``: a few kernels per group). With a GradScaler the fused step
    un-scales and skips on overflow on the device, without reading the overflow flag back.
    """
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    sgd = torch.optim.SGD(
        params,
        lr=cfg.SOLVER.BASE_LR,
        momentum=cfg.SOLVER.MOMENTUM,
        nesterov=cfg.SOLVER.NESTEROV,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        fused=True,
    )
    return maybe_add_gradient_clipping(cfg, sgd)
