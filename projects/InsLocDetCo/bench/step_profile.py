"""Where a training step's time goes: launches per step, host time, GPU busy share.

Imported by ``bench_e2e.py``. A step's cost on a GPU is the host's work of launching its
kernels unless each kernel has enough to do: the number of launches per step is the proxy that
the CPU can always measure. It is counted with ``torch.profiler`` as

* the ATen (and torchvision) operators dispatched from Python or from autograd (top level only:
  an operator's own inner calls are one launch, as a ``TorchDispatchMode`` counts them), plus
* the kernels that compiled graphs call (inductor's ``cpp_fused_*``/``triton_*``, visible with
  ``torch._inductor.config.cpp.enable_kernel_profile``; the extern operators they call, e.g. the
  convolutions, are ATen operators above).

On CUDA the profiler also sees the GPU kernels themselves and their busy time.
"""

import time
from collections import Counter
from typing import Dict, Iterable, Sequence, Tuple

import torch
from detectron2.utils.events import EventStorage

__all__ = ["enable_kernel_events", "count_launches", "profile_steps", "run_steps"]

OP_NAMESPACES = ("aten::", "torchvision::", "mkldnn::", "_c10d_functional::", "c10d::")
KERNEL_MARKS = ("cpp_fused", "triton_", "cpp_CppKernelProxy")
# Operators that only make a view, detach, or allocate: dispatched on the host, no GPU kernel.
METADATA_OPS = {
    "detach",
    "view",
    "_unsafe_view",
    "as_strided",
    "t",
    "transpose",
    "permute",
    "expand",
    "reshape",
    "unsqueeze",
    "squeeze",
    "select",
    "slice",
    "split",
    "split_with_sizes",
    "unbind",
    "chunk",
    "alias",
    "lift_fresh",
    "empty",
    "empty_strided",
    "empty_like",
    "resize_",
    "reinterpret_tensor",
    "flatten",
    "contiguous",
    "_reshape_alias",
    "narrow",
    "unflatten",
}


def enable_kernel_events():
    """Make inductor's CPU kernels visible to the profiler (before anything is compiled)."""
    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True


def run_steps(step, batch, steps: int, first_iter: int = 0):
    """``steps`` iterations of the trainer's ``step`` (``run_step``) on one repeated batch."""
    step._data_loader_iter_obj = iter([batch] * steps)
    with EventStorage(first_iter) as storage:
        step.storage = storage
        for i in range(first_iter, first_iter + steps):
            storage.iter = step.iter = i
            step.run_step()


def _is_op(name: str) -> bool:
    return name.startswith(OP_NAMESPACES)


def _is_kernel(name: str) -> bool:
    return any(mark in name for mark in KERNEL_MARKS)


def _under_op(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if _is_op(parent.name):
            return True
        parent = parent.cpu_parent
    return False


def host_launches(events: Iterable) -> Tuple[Dict[str, int], Counter]:
    """
    Returns:
        counts of top-level operators ("ops"), of those that are metadata-only or allocations
        (views, ``detach``, ``empty``: no kernel on a GPU, "metadata_ops"), and of compiled
        kernels; and the operators by name.
    """
    by_name = Counter()
    kernels = 0
    for e in events:
        if e.device_type.name != "CPU":
            continue
        if _is_kernel(e.name):
            kernels += 1
        elif _is_op(e.name) and not _under_op(e):
            by_name[e.name] += 1
    metadata = sum(n for name, n in by_name.items() if name.split("::")[1] in METADATA_OPS)
    counts = {"ops": sum(by_name.values()), "metadata_ops": metadata, "compiled_kernels": kernels}
    return counts, by_name


def count_launches(step, batch, steps: int = 2, top_ops: int = 12) -> Dict[str, float]:
    """
    Per training step (forward, backward, SGD), after one warm-up step: operators dispatched,
    compiled kernels called, their sum (``launches``), and on CUDA the GPU kernels.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available() and next(step.model.parameters()).is_cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    run_steps(step, batch, 1, first_iter=1)
    with profile(activities=activities) as prof:
        run_steps(step, batch, steps, first_iter=2)
    counts, by_name = host_launches(prof.events())
    counts = {k: v / steps for k, v in counts.items()}
    counts["launches"] = counts["ops"] + counts["compiled_kernels"]
    top = ", ".join(f"{name} {n / steps:.0f}" for name, n in by_name.most_common(top_ops))
    print(f"  most dispatched operators per step: {top}")
    if cuda:
        gpu = [e for e in prof.events() if e.device_type.name == "CUDA"]
        counts["gpu_kernels"] = len(gpu) / steps
    return counts


def profile_steps(step, batch, steps: int = 3, top: int = 8) -> Dict[str, float]:
    """GPU kernels per step, the GPU's busy share of the wall time, host ms per step; prints
    the operators that cost the host most."""
    from torch.profiler import ProfilerActivity, profile

    run_steps(step, batch, 1, first_iter=1)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        start, cpu = time.perf_counter(), time.thread_time()
        run_steps(step, batch, steps, first_iter=2)
        host = time.thread_time() - cpu
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy = sum(e.device_time_total for e in kernels) / 1e6  # microseconds -> s
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]:
        host_ms = e.self_cpu_time_total / steps / 1e3
        print(f"    host {host_ms:7.2f} ms/step  x{e.count // steps:<5} {e.key[:60]}")
    return {
        "gpu_kernels_per_step": len(kernels) / steps,
        "gpu_busy": busy / wall,
        "profiled_ms_per_step": wall / steps * 1e3,
        "profiled_host_ms_per_step": host / steps * 1e3,
    }


def ratio_lines(results: Sequence[Dict], keys: Sequence[str]) -> Iterable[str]:
    """For each batch size and method, "fast / eager" of each of ``keys`` (where both ran)."""
    by = {(r["method"], r["batch"], r["path"]): r for r in results}
    for (method, batch, path), fast in by.items():
        eager = by.get((method, batch, "eager"))
        if path != "fast" or eager is None:
            continue
        parts = [
            f"{k} {fast[k] / eager[k]:.2f}x"
            for k in keys
            if isinstance(fast.get(k), (int, float)) and eager.get(k)
        ]
        yield f"  {method} batch {batch}: fast / eager: " + ", ".join(parts)
