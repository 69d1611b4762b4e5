#!/usr/bin/env python
"""
Pretraining speed: training-step throughput and data-loader throughput, as ratios to baselines
measured in the same process (absolute img/s depend on the machine; ratios travel).

    python bench/bench_pretrain.py                                  # instant MoCo v2 config
    python bench/bench_pretrain.py --config-file pretrain_moco_v2.yaml --device cuda \
        SOLVER.IMS_PER_BATCH 32                                      # one GPU, full size

Reports:
  * step img/s of the method, and its ratio to a plain ResNet forward+backward of the query
    views alone (what the contrastive machinery costs on top of the backbone);
  * loader img/s per worker, and its ratio to decoding alone (what the augmentation costs);
  * how many loader workers one training process needs to keep the model fed.
Other bench scripts import :func:`measure_step` and :func:`measure_loader`.
"""

import argparse
import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_backbone, build_model  # noqa: E402
from detectron2.solver import build_optimizer  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from insloc_detco import add_insloc_detco_config  # noqa: E402
from insloc_detco.data import build_pretrain_mapper, get_pretrain_dataset_dicts  # noqa: E402
from insloc_detco.data.build import build_pretrain_train_loader  # noqa: E402
from insloc_detco.data.reading import read_rgb_image  # noqa: E402
from insloc_detco.engine import resolve_config_file  # noqa: E402


def load_cfg(config_file: str, opts=()):
    cfg = get_cfg()
    add_insloc_detco_config(cfg)
    cfg.merge_from_file(resolve_config_file(config_file))
    cfg.merge_from_list(list(opts))
    return cfg


def mapped_batch(cfg):
    """One per-process batch of real mapper outputs (collated if the mapper collates)."""
    dicts = get_pretrain_dataset_dicts(cfg.DATASETS.TRAIN)
    mapper = build_pretrain_mapper(cfg, dicts)
    batch = []
    for d in itertools.cycle(dicts):
        out = mapper(d)
        if out is not None:
            out.pop("num_skipped", None)
            batch.append(out)
        if len(batch) == cfg.SOLVER.IMS_PER_BATCH:
            break
    return mapper.collate(batch) if hasattr(mapper, "collate") else batch


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def measure_step(cfg, iters: int = 5, warmup: int = 2, clock=time.perf_counter) -> float:
    """Training steps (forward, backward, SGD) of the model built from ``cfg``: img/s.
    ``clock``: ``time.process_time`` gives img per CPU-second, steadier on a shared CPU."""
    model = build_model(cfg)
    model.train()
    optimizer = build_optimizer(cfg, model)
    batch = mapped_batch(cfg)
    with EventStorage(0):
        for i in range(warmup + iters):
            if i == warmup:
                _sync(cfg.MODEL.DEVICE)
                start = clock()
            losses = sum(model(batch).values())
            optimizer.zero_grad()
            losses.backward()
            optimizer.step()
        _sync(cfg.MODEL.DEVICE)
    return len(batch) * iters / (clock() - start)


def select_clock(name, device: str):
    """
    The step timer: "wall" (``perf_counter``) or "cpu" (``process_time`` on one torch thread;
    on a CPU shared with other jobs wall time swings several-fold, CPU time does not, and
    waiting OpenMP threads spin and would bill CPU time). ``name`` None: "cpu" on the CPU.
    Returns (name, clock).
    """
    name = name or ("cpu" if device == "cpu" else "wall")
    if name == "cpu":
        torch.set_num_threads(1)
        return name, time.process_time
    return name, time.perf_counter


def add_timing_arguments(parser, iters: int, repeats: int):
    """The step-timing options the benches share: --device, --iters, --clock, --repeats."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iters", type=int, default=iters)
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default=None,
        help="step timer; default: cpu (process CPU time) on the CPU, wall on a GPU",
    )
    parser.add_argument("--repeats", type=int, default=repeats, help="interleaved runs, best kept")


def measure_backbone_step(cfg, iters: int = 5, warmup: int = 2) -> float:
    """Baseline: forward+backward of the backbone alone on one view per image: img/s."""
    model = build_backbone(cfg).to(cfg.MODEL.DEVICE).train()
    size = cfg.INPUT.PRETRAIN.CROP_SIZE
    x = torch.randn(cfg.SOLVER.IMS_PER_BATCH, 3, size, size, device=cfg.MODEL.DEVICE)
    for i in range(warmup + iters):
        if i == warmup:
            _sync(cfg.MODEL.DEVICE)
            start = time.perf_counter()
        sum(f.float().mean() for f in model(x).values()).backward()
    _sync(cfg.MODEL.DEVICE)
    return x.shape[0] * iters / (time.perf_counter() - start)


def measure_loader(cfg, batches: int = 5) -> float:
    """The real training loader (workers from DATALOADER.NUM_WORKERS): img/s per worker."""
    it = iter(build_pretrain_train_loader(cfg))
    next(it)  # worker start-up is not throughput
    start = time.perf_counter()
    n = sum(len(next(it)) for _ in range(batches))
    return n / (time.perf_counter() - start) / max(1, cfg.DATALOADER.NUM_WORKERS)


def measure_decode(cfg, images: int = 20) -> float:
    """Baseline: decoding alone (same reader and size cap as the mapper): img/s."""
    dicts = get_pretrain_dataset_dicts(cfg.DATASETS.TRAIN)
    p = cfg.INPUT.PRETRAIN
    start = time.perf_counter()
    for d in itertools.islice(itertools.cycle(dicts), images):
        try:
            read_rgb_image(d["file_name"], p.MIN_IMAGE_SIZE, p.MAX_DECODE_SIZE)
        except Exception:
            pass
    return images / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default="instant_test/pretrain_moco_v2.yaml")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    cfg = load_cfg(args.config_file, ["MODEL.DEVICE", args.device, *args.opts])
    torch.manual_seed(0)
    print(
        f"config {args.config_file}: batch {cfg.SOLVER.IMS_PER_BATCH}, "
        f"{cfg.INPUT.PRETRAIN.CROP_SIZE} px, device {args.device}, torch threads "
        f"{torch.get_num_threads()}"
    )
    step = measure_step(cfg, args.iters)
    base = measure_backbone_step(cfg, args.iters)
    loader = measure_loader(cfg)
    decode = measure_decode(cfg)
    print(f"{cfg.MODEL.META_ARCHITECTURE} step:      {step:8.2f} img/s")
    print(f"backbone fwd+bwd (1 view):  {base:8.2f} img/s   step / backbone = {step / base:.3f}")
    print(f"loader per worker:          {loader:8.2f} img/s")
    print(
        f"decode only:                {decode:8.2f} img/s   loader / decode = {loader / decode:.3f}"
    )
    print(f"workers needed to feed one training process: {step / loader:.2f}")


if __name__ == "__main__":
    main()
