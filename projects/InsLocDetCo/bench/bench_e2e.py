#!/usr/bin/env python
"""
End-to-end pretraining throughput: the real training loop against the model alone.

    # 2-core CPU, instant scale
    python bench/bench_e2e.py --config-file instant_test/pretrain_moco_v2.yaml --workers 1
    # one GPU, the paper's sizes, AMP + channels-last, photometric augmentation on the GPU
    python bench/bench_e2e.py --config-file pretrain_moco_v2.yaml --device cuda --batch 64 \\
        --workers 15 --augment-on device --amp --channels-last --data jpeg:512

It builds train_net.py's trainer (``PretrainTrainer``: the real loader and workers, hooks,
thread settings), trains ``--warmup + --iters`` iterations, and reports **global averages**
over the ``--iters`` timed ones (detectron2's console and ``metrics.json`` show windowed medians,
which hide loader stalls):

* end-to-end img/s = images / wall time;
* the fraction of that time the loop waited for the loader (``data_time`` summed);
* the model-only rate: the same trainer stepping on one pre-loaded batch, repeated (forward,
  backward, SGD, and the photometric augmentation when it runs on the device);
* their ratio (1.0 = the loader never holds the model back).

``--data jpeg:N`` writes N ImageNet-like JPEGs (random crops of scikit-image's photos, 400-500 x
300-375 px, quality 90) and trains on them; ``pretrain_demo`` (the default) is the 18 photos as
shipped. Results go to stdout and, with ``--out``, to a JSON file.
"""
import argparse
import itertools
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_pretrain import load_cfg  # noqa: E402
from detectron2.engine import HookBase, hooks  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

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

    def _sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def before_step(self):
        if self.trainer.iter == self.start:
            self._sync()
            self.t0 = time.perf_counter()

    def after_step(self):
        if self.trainer.iter == self.trainer.max_iter - 1:
            self._sync()
            self.t1 = time.perf_counter()

    def data_time(self) -> float:
        history = self.trainer.storage.history("data_time")
        return sum(v for v, it in history.values() if it >= self.start)


def model_only_rate(trainer, batch, iters: int, warmup: int, device: str):
    """
    The trainer's own step on one pre-loaded batch, repeated.

    Returns:
        img/s, and the training thread's CPU time per step / wall time per step (near 1: the
        host, not the GPU, sets the pace).
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
    wall = time.perf_counter() - start
    return len(batch) * iters / wall, (time.thread_time() - cpu_start) / wall


def profile_steps(trainer, steps: int = 3):
    """GPU kernels per step and the GPU's busy fraction of the wall time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    step = trainer._trainer
    with EventStorage(0) as storage, profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]
    ) as prof:
        step.storage = storage
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(steps):
            storage.iter = step.iter = i
            step.run_step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy = sum(e.device_time_total for e in kernels) / 1e6  # microseconds -> s
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    print(f"  profile: {len(kernels) / steps:.0f} GPU kernels per step, GPU busy "
          f"{busy / wall:.0%} of the wall time ({wall / steps * 1e3:.1f} ms/step)")
    for e in top:
        host_ms = e.self_cpu_time_total / steps / 1e3
        print(f"    host {host_ms:7.2f} ms/step  x{e.count // steps:<5} {e.key[:60]}")


def build_config(args):
    opts = [
        "MODEL.DEVICE", args.device,
        "SOLVER.IMS_PER_BATCH", args.batch,
        "SOLVER.REFERENCE_WORLD_SIZE", 0,
        "SOLVER.EPOCHS", 0,
        "SOLVER.MAX_ITER", args.warmup + args.iters,
        "SOLVER.CHECKPOINT_PERIOD", 10**9,
        "SOLVER.LOG_PERIOD", max(1, (args.warmup + args.iters) // 4),
        "SOLVER.PLOT_CURVES", False,
        "SOLVER.AMP.ENABLED", args.amp,
        "MODEL.CHANNELS_LAST", args.channels_last,
        "DATALOADER.NUM_WORKERS", args.workers,
        "INPUT.PRETRAIN.AUGMENT_ON", args.augment_on,
        "CUDNN_BENCHMARK", args.device.startswith("cuda"),
        "OUTPUT_DIR", args.output_dir,
    ]  # fmt: skip
    if args.data:
        opts += ["DATASETS.TRAIN", f"('{args.data}',)"]
    cfg = load_cfg(args.config_file, [*opts, *args.opts])
    if cfg.MODEL.CONTRAST.QUEUE_SIZE < args.batch:
        cfg.MODEL.CONTRAST.QUEUE_SIZE = args.batch
    resolve_device(cfg)
    return cfg


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default="instant_test/pretrain_moco_v2.yaml")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8, help="images per step")
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
    parser.add_argument("--profile", action="store_true", help="GPU kernels and busy time")
    parser.add_argument("--out", default="", help="append the result as a JSON line here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()
    args.output_dir = tempfile.mkdtemp(prefix="bench_e2e_")
    if args.data.startswith("jpeg:"):
        root = os.path.join(tempfile.gettempdir(), f"bench_e2e_jpeg_{args.data[5:]}")
        if not os.path.isdir(root):
            write_jpeg_folder(root, int(args.data[5:]))
        args.data = f"folder:{root}"
    setup_logger(name="insloc_detco")
    setup_logger(name="detectron2")
    cfg = build_config(args)
    torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK
    torch.manual_seed(0)

    trainer = PretrainTrainer(cfg)
    # What a step costs in steady state: no checkpoints or plots inside the timed window.
    trainer._hooks = [
        h for h in trainer._hooks
        if not isinstance(h, (hooks.PeriodicCheckpointer, PlotCurvesHook))
    ]  # fmt: skip
    e2e = waiting = float("nan")
    if not args.model_only:
        timer = GlobalTimer(args.warmup, cfg.MODEL.DEVICE)
        trainer.register_hooks([timer])
        trainer.train()
        wall = timer.t1 - timer.t0
        e2e = args.batch * args.iters / wall
        waiting = timer.data_time() / wall

    model = getattr(trainer.model, "module", trainer.model)  # unwrap DDP
    batch = next(trainer._trainer._data_loader_iter)
    model_only, host_bound = model_only_rate(
        trainer, batch, args.iters, args.warmup, cfg.MODEL.DEVICE
    )
    result = {
        "method": cfg.MODEL.META_ARCHITECTURE,
        "config": args.config_file,
        "device": torch.cuda.get_device_name() if cfg.MODEL.DEVICE.startswith("cuda") else "cpu",
        "batch": args.batch,
        "workers": args.workers,
        "augment_on": "device" if model.augmentation is not None else "loader",
        "amp": args.amp,
        "channels_last": args.channels_last,
        "threads": torch.get_num_threads(),
        "data": cfg.DATASETS.TRAIN[0],
        "iters": args.iters,
        "e2e_img_s": round(e2e, 1),
        "data_wait_fraction": round(waiting, 3),
        "model_only_img_s": round(model_only, 1),
        "host_cpu_per_wall": round(host_bound, 3),
        "e2e_over_model_only": round(e2e / model_only, 3),
    }
    print(
        f"\n{result['method']} on {result['device']}, batch {args.batch}, {args.workers} workers, "
        f"augmentation on {result['augment_on']}, amp {args.amp}, channels_last "
        f"{args.channels_last}, {result['threads']} threads:\n"
        f"  end to end   {e2e:9.1f} img/s (global average over {args.iters} iterations)\n"
        f"  waiting for data {waiting:6.1%} of the time\n"
        f"  model only   {model_only:9.1f} img/s (same trainer, one batch repeated; training "
        f"thread busy {host_bound:.0%} of it)\n"
        f"  end to end / model only = {e2e / model_only:.3f}"
    )
    if args.profile and cfg.MODEL.DEVICE.startswith("cuda"):
        profile_steps(trainer)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
