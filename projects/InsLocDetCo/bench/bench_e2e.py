#!/usr/bin/env python
"""
End-to-end pretraining throughput, eager vs fast path: the real training loop against the model
alone, and where a step's time goes.

    # 2-core CPU, instant scale: img/s and launches per step (operators + compiled kernels)
    python bench/bench_e2e.py --config-file instant_test/pretrain_moco_v2.yaml --workers 1 \
        --augment-on device --kernels
    # one GPU, the paper's sizes, at 32..256 images per GPU, both paths in one run
    python bench/bench_e2e.py --config-file pretrain_moco_v2.yaml --device cuda \
        --batches 32,64,128,256 --workers 15 --augment-on device --amp --channels-last \
        --data jpeg:2048 --profile --kernels

For every batch size in ``--batches`` and path in ``--paths`` (``MODEL.FAST_PATH.ENABLED`` off /
on), it builds train_net.py's trainer (``PretrainTrainer``: the real loader and workers, hooks,
thread settings), trains ``--warmup + --iters`` iterations, and reports **global averages**
over the ``--iters`` timed ones (detectron2's console and ``metrics.json`` show windowed medians,
which hide loader stalls):

* end-to-end img/s = images / wall time, and the fraction of it spent waiting for the loader;
* the model-only rate: the same trainer stepping on one pre-loaded batch, repeated (forward,
  backward, SGD, and the photometric augmentation when it runs on the device), the host's CPU
  ms per step and its share of the wall time (near 1: the host sets the pace);
* their ratio (1.0 = the loader never holds the model back);
* ``--kernels``: launches per step (``step_profile.py``: operators dispatched + compiled
  kernels; GPU kernels on CUDA); ``--profile`` (CUDA): GPU busy share and kernels per step;
* then each figure of the fast path as a ratio to eager's at the same batch.

``--data jpeg:N`` writes N ImageNet-like JPEGs (random crops of scikit-image's photos, 400-500 x
300-375 px, quality 90) and trains on them; ``pretrain_demo`` (the default) is the 18 photos as
shipped. Results go to stdout and, with ``--out``, as JSON lines to a file.
"""

import argparse
import gc
import itertools
import json
import os
import sys
import tempfile
import time
from typing import Dict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_pretrain import load_cfg  # noqa: E402
from detectron2.engine import HookBase, hooks  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from step_profile import (  # noqa: E402
    count_launches,
    enable_kernel_events,
    profile_steps,
    ratio_lines,
)

from insloc_detco.engine import PretrainTrainer, resolve_device  # noqa: E402
from insloc_detco.engine.hooks import PlotCurvesHook  # noqa: E402


def write_jpeg_folder(root: str, num: int, seed: int = 0) -> str:
    """``num`` ImageNet-sized JPEGs cut from scikit-image's photos; returns the folder."""
    from PIL import Image

    from insloc_detco.data import get_pretrain_dataset_dicts

    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = [d["file_name"] for d in get_pretrain_dataset_dicts("pretrain_demo")]
    photos = [Image.open(f).convert("RGB") for f in files]
    for i in range(num):
        photo = photos[i % len(photos)]
        w, h = int(rng.integers(400, 501)), int(rng.integers(300, 376))
        scale = max(w / photo.width, h / photo.height) * rng.uniform(1.0, 1.5)
        big = photo.resize((int(photo.width * scale) + 1, int(photo.height * scale) + 1))
        x, y = int(rng.integers(0, big.width - w + 1)), int(rng.integers(0, big.height - h + 1))
        big.crop((x, y, x + w, y + h)).save(os.path.join(root, f"{i:05d}.jpg"), quality=90)
    return root


class GlobalTimer(HookBase):
    """Wall time and summed loader wait of the iterations from ``start`` on (GPU synced)."""

    def __init__(self, start: int, device: str):
        self.start, self.device = start, device
        self.t0 = self.t1 = None
        self.first_step_s = None  # includes compilation on the fast path

    def _sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def before_step(self):
        if self.trainer.iter == 0:
            self._sync()
            self.first_start = time.perf_counter()
        if self.trainer.iter == self.start:
            self._sync()
            self.t0 = time.perf_counter()

    def after_step(self):
        if self.trainer.iter == 0:
            self._sync()
            self.first_step_s = time.perf_counter() - self.first_start
        if self.trainer.iter == self.trainer.max_iter - 1:
            self._sync()
            self.t1 = time.perf_counter()

    def data_time(self) -> float:
        history = self.trainer.storage.history("data_time")
        return sum(v for v, it in history.values() if it >= self.start)


def model_only_rate(trainer, batch, iters: int, warmup: int, device: str) -> Dict:
    """
    The trainer's own step on one pre-loaded batch, repeated.

    Returns:
        img/s; the training thread's CPU ms per step, and its CPU time / wall time (near 1:
        the host, not the GPU, sets the pace).
    """
    step = trainer._trainer
    step._data_loader_iter_obj = itertools.repeat(batch)
    with EventStorage(0) as storage:
        step.storage = storage
        for i in range(warmup + iters):
            if i == warmup:
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                start, cpu_start = time.perf_counter(), time.thread_time()
            storage.iter = step.iter = i
            step.run_step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - start, time.thread_time() - cpu_start
    return {
        "model_only_img_s": round(len(batch) * iters / wall, 1),
        "host_ms_per_step": round(cpu / iters * 1e3, 2),
        "host_cpu_per_wall": round(cpu / wall, 3),
    }


def build_config(args, path: str, batch: int):
    opts = [
        "MODEL.DEVICE",
        args.device,
        "MODEL.FAST_PATH.ENABLED",
        "on" if path == "fast" else "off",
        "SOLVER.IMS_PER_BATCH",
        batch,
        "SOLVER.REFERENCE_WORLD_SIZE",
        0,
        "SOLVER.EPOCHS",
        0,
        "SOLVER.MAX_ITER",
        args.warmup + args.iters,
        "SOLVER.CHECKPOINT_PERIOD",
        10**9,
        "SOLVER.LOG_PERIOD",
        max(1, (args.warmup + args.iters) // 4),
        "SOLVER.PLOT_CURVES",
        False,
        "SOLVER.AMP.ENABLED",
        args.amp,
        "MODEL.CHANNELS_LAST",
        args.channels_last,
        "DATALOADER.NUM_WORKERS",
        args.workers,
        "INPUT.PRETRAIN.AUGMENT_ON",
        args.augment_on,
        "CUDNN_BENCHMARK",
        args.device.startswith("cuda"),
        "OUTPUT_DIR",
        args.output_dir,
    ]
    if args.data:
        opts += ["DATASETS.TRAIN", f"('{args.data}',)"]
    cfg = load_cfg(args.config_file, [*opts, *args.opts])
    if cfg.MODEL.CONTRAST.QUEUE_SIZE < batch:
        cfg.MODEL.CONTRAST.QUEUE_SIZE = batch
    resolve_device(cfg)
    return cfg


def end_to_end(trainer, args, batch: int) -> Dict:
    """Train the configured iterations through the real loader; global averages."""
    timer = GlobalTimer(args.warmup, trainer.cfg.MODEL.DEVICE)
    trainer.register_hooks([timer])
    trainer.train()
    wall = timer.t1 - timer.t0
    return {
        "e2e_img_s": round(batch * args.iters / wall, 1),
        "data_wait_fraction": round(timer.data_time() / wall, 3),
        "first_step_s": round(timer.first_step_s, 1),
    }


def run_one(args, path: str, batch: int) -> Dict:
    """Every figure of one (path, batch size) configuration, in a fresh trainer."""
    cfg = build_config(args, path, batch)
    torch._dynamo.reset()
    torch.manual_seed(0)
    trainer = PretrainTrainer(cfg)
    # What a step costs in steady state: no checkpoints or plots inside the timed window.
    trainer._hooks = [
        h for h in trainer._hooks if not isinstance(h, (hooks.PeriodicCheckpointer, PlotCurvesHook))
    ]
    result = {"e2e_img_s": float("nan"), "data_wait_fraction": float("nan")}
    if not args.model_only:
        result.update(end_to_end(trainer, args, batch))
    model = getattr(trainer.model, "module", trainer.model)  # unwrap DDP
    data = next(trainer._trainer._data_loader_iter)
    result.update(model_only_rate(trainer, data, args.iters, args.warmup, cfg.MODEL.DEVICE))
    result["e2e_over_model_only"] = round(result["e2e_img_s"] / result["model_only_img_s"], 3)
    if args.kernels:
        launches = count_launches(trainer._trainer, data)
        result.update({f"{k}_per_step": round(v, 1) for k, v in launches.items()})
    if args.profile and cfg.MODEL.DEVICE.startswith("cuda"):
        result.update(profile_steps(trainer._trainer, data))
    on_cuda = cfg.MODEL.DEVICE.startswith("cuda")
    result = {
        "method": cfg.MODEL.META_ARCHITECTURE,
        "path": path,
        "config": args.config_file,
        "device": torch.cuda.get_device_name() if on_cuda else "cpu",
        "batch": batch,
        "workers": args.workers,
        "augment_on": "device" if model.augmentation is not None else "loader",
        "amp": args.amp,
        "channels_last": args.channels_last,
        "threads": torch.get_num_threads(),
        "data": cfg.DATASETS.TRAIN[0],
        "iters": args.iters,
        "torch": torch.__version__,
        **result,
    }
    del trainer, model, data
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()
    return result


def describe(r: Dict) -> str:
    lines = [
        f"\n{r['method']} [{r['path']}] on {r['device']}, batch {r['batch']}, {r['workers']} "
        f"workers, augmentation on {r['augment_on']}, amp {r['amp']}, channels_last "
        f"{r['channels_last']}, {r['threads']} threads:",
        f"  end to end   {r['e2e_img_s']:9.1f} img/s (global average over {r['iters']} "
        f"iterations), waiting for data {r['data_wait_fraction']:.1%} of the time",
        f"  model only   {r['model_only_img_s']:9.1f} img/s (one batch repeated; host "
        f"{r['host_ms_per_step']:.1f} ms CPU per step, busy {r['host_cpu_per_wall']:.0%} of "
        f"the wall time)",
        f"  end to end / model only = {r['e2e_over_model_only']:.3f}; first step (compiles on "
        f"the fast path) {r.get('first_step_s', float('nan')):.1f} s",
    ]
    if "launches_per_step" in r:
        gpu = r.get("gpu_kernels_per_step")
        gpu = f", {gpu:.0f} GPU kernels" if gpu is not None else ""
        lines.append(
            f"  launches per step {r['launches_per_step']:.0f} = {r['ops_per_step']:.0f} "
            f"operators ({r['metadata_ops_per_step']:.0f} of them views/allocations) + "
            f"{r['compiled_kernels_per_step']:.0f} compiled kernels{gpu}"
        )
    if "gpu_busy" in r:
        lines.append(
            f"  profile: GPU busy {r['gpu_busy']:.0%} of the wall time, "
            f"{r['gpu_kernels_per_step']:.0f} GPU kernels per step"
        )
    return "\n".join(lines)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default="instant_test/pretrain_moco_v2.yaml")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8, help="images per step")
    parser.add_argument("--batches", default="", help="several batch sizes, e.g. 32,64,128")
    parser.add_argument("--paths", default="eager,fast", help="eager, fast, or both")
    parser.add_argument("--workers", type=int, default=1, help="loader workers")
    parser.add_argument("--augment-on", default="auto", choices=("auto", "loader", "device"))
    parser.add_argument("--amp", action="store_true", help="SOLVER.AMP.ENABLED (CUDA)")
    parser.add_argument(
        "--channels-last", action="store_true", help="MODEL.CHANNELS_LAST (off unless given)"
    )
    parser.add_argument("--iters", type=int, default=10, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    parser.add_argument("--data", default="", help="dataset name, or jpeg:N (generated)")
    parser.add_argument("--model-only", action="store_true", help="skip the end-to-end run")
    parser.add_argument("--kernels", action="store_true", help="launches per step (profiler)")
    parser.add_argument("--profile", action="store_true", help="GPU kernels and busy time")
    parser.add_argument("--out", default="", help="append the results as JSON lines here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()
    args.batches = [int(b) for b in (args.batches or str(args.batch)).split(",")]
    args.paths = [p for p in args.paths.split(",") if p]
    assert set(args.paths) <= {"eager", "fast"}, f"--paths: eager and/or fast, not {args.paths}"
    return args


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as scratch:  # the runs' writers' files
        args.output_dir = scratch
        run_all(args)


def run_all(args):
    if args.data.startswith("jpeg:"):
        root = os.path.join(tempfile.gettempdir(), f"bench_e2e_jpeg_{args.data[5:]}")
        if not os.path.isdir(root):
            write_jpeg_folder(root, int(args.data[5:]))
        args.data = f"folder:{root}"
    setup_logger(name="insloc_detco")
    setup_logger(name="detectron2")
    if args.kernels:
        enable_kernel_events()
    results = []
    for batch in args.batches:
        for path in args.paths:
            results.append(run_one(args, path, batch))
            print(describe(results[-1]), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(results[-1]) + "\n")
    keys = ["e2e_img_s", "model_only_img_s", "host_ms_per_step", "launches_per_step"]
    for line in ratio_lines(results, keys + ["gpu_kernels_per_step", "gpu_busy"]):
        print(line)


if __name__ == "__main__":
    main()
