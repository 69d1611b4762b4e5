#!/usr/bin/env python
"""
Decoding and cropping for pretraining: where it can run, what it costs, ratios to Pillow.

    python bench/bench_decode.py --data jpeg:64                            # CPU placements
    python bench/bench_decode.py --data jpeg:64 --grain 6                  # ImageNet-like files
    python bench/bench_decode.py --data jpeg:2048 --device cuda --batch 64  # + the GPU

One thread, process CPU time (what one loader worker spends), in the same process:

1. **Per MoCo v2 sample**, decode + two RandomResizedCrop views (224 px): Pillow with
   torchvision's RandomResizedCrop on PIL images (MoCo's reference pipeline), the same with
   Pillow's JPEG draft mode (reduced-size DCT decoding, a no-op on ImageNet-sized photos: it
   only shrinks images at least twice the view), ``torchvision.io.decode_jpeg`` on the CPU with
   the crops on tensors (the loader placement), and what a worker does with
   ``DECODE_ON: device`` (bytes, header, two box draws). ``decode_jpeg`` has no reduced-size
   decoding.
2. **Per sample of each method's mapper** (``AUGMENT_ON: device``), mapper + the worker's
   collate + pickling a batch for the main process, with decoding in the loader and, where the
   mapper has it, on the device; and the loader's ceiling with ``--workers`` workers,
   samples/s = workers / CPU-seconds per sample.
3. **The training process's side of device decoding** (``decode_views``) on ``--device`` per
   batch: img/s, host CPU time, and the operators it dispatches (each one a kernel launch on
   a GPU), against ``torchvision.ops.roi_align`` over all crops of a zero-padded batch (one
   launch per view kind, not antialiased), with the pixels' distance to the loader's views.

``--data jpeg:N`` writes N ImageNet-sized JPEGs (``bench_e2e.py``: crops of scikit-image's
photos, 400-500 x 300-375 px, quality 90); ``--grain S`` adds Gaussian noise of S levels before
encoding, for files nearer ImageNet's ~110 KB (the smooth photos compress to ~35 KB).
"""

import argparse
import io
import itertools
import os
import sys
import time
from multiprocessing.reduction import ForkingPickler

import numpy as np
import torch
import torch.multiprocessing  # noqa: F401  (registers the shared-memory reductions)
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align
from torchvision.transforms import RandomResizedCrop

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_e2e import write_jpeg_folder  # noqa: E402
from bench_pretrain import load_cfg  # noqa: E402

from insloc_detco.data import build_pretrain_mapper, get_pretrain_dataset_dicts  # noqa: E402
from insloc_detco.data.augmentation import build_view_crop, draw_crop_box  # noqa: E402
from insloc_detco.data.batch import BatchCollator  # noqa: E402
from insloc_detco.data.device_decode import cut_views, decode_views  # noqa: E402
from insloc_detco.data.reading import read_image_for_device  # noqa: E402

METHODS = {  # name: (config, DECODE_ON placements to measure, extra options)
    "MoCo v2": ("pretrain_moco_v2.yaml", ("loader", "device"), []),
    "DetCo": ("pretrain_detco.yaml", ("loader", "device"), []),
    "InsLoc, dataset bg": ("pretrain_insloc_fpn.yaml", ("loader",), []),
    "InsLoc, batch bg": (
        "pretrain_insloc_c4.yaml",
        ("loader",),
        ["INPUT.PRETRAIN.COPY_PASTE.BACKGROUND", "batch"],
    ),
}


def cpu_seconds(fn, items, repeats: int = 3) -> float:
    """Best over ``repeats`` of the process CPU time of ``fn`` per item (after one warm-up)."""
    fn(items[0])
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for item in items:
            fn(item)
        best = min(best, (time.process_time() - start) / len(items))
    return best


def moco_sample_variants(size: int):
    """Per-sample functions of the file bytes: decode + two RandomResizedCrop views."""
    pil_crop = RandomResizedCrop(size, scale=(0.2, 1.0))
    cfg = load_cfg("pretrain_moco_v2.yaml", ["INPUT.PRETRAIN.CROP_SIZE", size])
    crop = build_view_crop(cfg)

    def pillow(data, draft=False):
        image = Image.open(io.BytesIO(data))
        if draft:
            image.draft("RGB", (size, size))
        image = image.convert("RGB")
        return [torch.from_numpy(np.asarray(pil_crop(image)).copy()) for _ in range(2)]

    def tensors(data):
        image = decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
        return crop(image), crop(image)

    return [
        ("Pillow + RandomResizedCrop on PIL images", pillow),
        ("Pillow draft mode + the same", lambda d: pillow(d, draft=True)),
        ("decode_jpeg (CPU) + crops on tensors: loader", tensors),
    ]


def bench_moco_sample(files, size: int):
    print(f"\n== One MoCo v2 sample: decode + two {size} px views, one thread, CPU time ==")
    datas = [bytearray(open(f, "rb").read()) for f in files]
    base = None
    for name, fn in moco_sample_variants(size):
        t = cpu_seconds(fn, datas)
        base = base or t
        print(f"{name:<48} {t * 1e3:7.2f} ms  x{base / t:5.2f} Pillow's speed")
    crop = build_view_crop(load_cfg("pretrain_moco_v2.yaml", ["INPUT.PRETRAIN.CROP_SIZE", size]))

    def header_only(f):  # what a worker does for DECODE_ON: device
        image = read_image_for_device(f)
        return [draw_crop_box(crop, *image.shape[-2:]) for _ in range(2)]

    t = cpu_seconds(header_only, files)
    print(
        f"{'bytes + header + 2 box draws: DECODE_ON device':<48} {t * 1e3:7.2f} ms  "
        f"x{base / t:5.2f} Pillow's speed"
    )
    return base


def build_mapper(config, opts, data, where):
    cfg = load_cfg(
        config,
        [
            "DATASETS.TRAIN",
            f"('{data}',)",
            "INPUT.PRETRAIN.AUGMENT_ON",
            "device",
            "INPUT.PRETRAIN.DECODE_ON",
            where,
            "MODEL.DEVICE",
            "cpu",
            *opts,
        ],
    )
    dicts = get_pretrain_dataset_dicts(cfg.DATASETS.TRAIN)
    return build_pretrain_mapper(cfg, dicts), dicts


def worker_batch(mapper, records):
    """What a loader worker does for one batch: map, collate, pickle for the main process."""
    batch = BatchCollator(getattr(mapper, "collate", None))([mapper(dict(d)) for d in records])
    ForkingPickler.dumps(batch)  # moves the tensors into shared memory, as a worker does
    return batch


def bench_mappers(data: str, workers: int, batch: int):
    print(
        f"\n== Loader worker CPU-seconds per sample (mapper + collate + pickling), one thread;"
        f" ceiling with {workers} workers =="
    )
    for name, (config, placements, opts) in METHODS.items():
        for where in placements:
            mapper, dicts = build_mapper(config, opts, data, where)
            records = list(itertools.islice(itertools.cycle(dicts), 4 * batch))
            batches = [records[i : i + batch] for i in range(0, len(records), batch)]
            t = cpu_seconds(lambda b: worker_batch(mapper, b), batches) / batch
            print(
                f"{name:<20} decode on {where:<7} {t * 1e3:7.2f} ms/sample  "
                f"ceiling {workers / t:9,.0f} samples/s"
            )


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched that compute (views excluded): on a GPU, about one
    kernel launch each."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def roi_align_views(images, crops, device):
    """The alternative to per-crop resizes: one roi_align per view kind over a zero-padded
    float batch (bilinear samples averaged per output pixel, not antialiased)."""
    h, w = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    padded = torch.zeros((len(images), 3, h, w), device=device)
    for n, image in enumerate(images):
        padded[n, :, : image.shape[1], : image.shape[2]] = image
    out = {}
    for key, spec in crops.items():
        top, left, ch, cw, oh, ow = spec.to(device, torch.float32).unbind(1)
        rois = torch.stack(
            [
                torch.arange(len(images), device=device, dtype=torch.float32),
                left,
                top,
                left + cw,
                top + ch,
            ],
            dim=1,
        )
        size = (int(spec[0, 4]), int(spec[0, 5]))
        views = roi_align(padded, rois, size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        out[key] = views.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, items, device):
    """Wall and process CPU seconds per item of ``fn`` (after a warm-up on the first item,
    which also counts the operators it dispatches)."""
    counter = OpCounter()
    with counter:
        fn(items[0])
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for item in items[1:]:
        fn(item)
    _sync(device)
    n = len(items) - 1
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n, counter.count


def bench_device_side(data: str, device: str, batch: int, pillow_s: float, repeats: int = 5):
    print(f"\n== The training process's side of DECODE_ON device, batch {batch}, on {device} ==")
    mapper, dicts = build_mapper("pretrain_moco_v2.yaml", [], data, "device")
    records = list(itertools.islice(itertools.cycle(dicts), batch))
    torch.manual_seed(0)
    packed = [worker_batch(mapper, records) for _ in range(repeats + 1)]
    torch.manual_seed(0)
    reference = worker_batch(build_mapper("pretrain_moco_v2.yaml", [], data, "loader")[0], records)
    enc = packed[-1].encoded
    wall, cpu, ops = timed(lambda b: decode_views(b, device), packed, device)
    diff = (packed[0].tensors["view_q"].cpu().int() - reference.tensors["view_q"].int()).abs()
    speedup = pillow_s * batch / wall
    print(
        f"decode + per-crop resized_crop  {batch / wall:9,.0f} img/s, x{speedup:.1f} Pillow "
        f"on one core; host CPU {cpu * 1e3:.1f} ms/batch; {ops} ops/batch; vs the loader's "
        f"views: max {diff.max()}, mean {diff.float().mean():.3f} levels"
    )
    wall, _, ops = timed(
        lambda f: decode_jpeg(f, ImageReadMode.RGB, device), [enc.files()] * 3, device
    )
    print(f"decode only (one decode_jpeg)   {batch / wall:9,.0f} img/s; {ops} ops/batch")
    images = [i.float() for i in decode_jpeg(enc.files(), ImageReadMode.RGB, device)]
    rows = list(range(len(images)))
    variants = {
        "crops only, per-crop (ours)": lambda c: [cut_views(images, v, rows) for v in c.values()],
        "crops only, roi_align (padded)": lambda c: roi_align_views(images, c, device),
    }
    for name, fn in variants.items():
        wall, _, ops = timed(fn, [enc.crops] * 3, device)
        print(f"{name:<31} {batch / wall:9,.0f} img/s; {ops} ops/batch")


def jpeg_folder(spec: str, grain: float) -> str:
    """``jpeg:N`` -> a folder of N generated JPEGs (with ``grain`` levels of noise)."""
    num = int(spec[5:])
    root = f"/tmp/bench_e2e_jpeg_{num}"
    if not os.path.isdir(root):
        write_jpeg_folder(root, num)
    if grain <= 0:
        return root
    noisy = f"/tmp/bench_decode_jpeg_{num}_grain{grain:g}"
    if not os.path.isdir(noisy):
        os.makedirs(noisy)
        rng = np.random.default_rng(0)
        for name in sorted(os.listdir(root)):
            pixels = np.asarray(Image.open(os.path.join(root, name)), dtype=np.float32)
            pixels = pixels + rng.normal(0, grain, pixels.shape)
            image = Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))
            image.save(os.path.join(noisy, name), quality=90)
    return noisy


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="jpeg:64", help="jpeg:N (generated) or a dataset")
    parser.add_argument("--grain", type=float, default=0.0, help="noise levels for jpeg:N")
    parser.add_argument("--device", default="cpu", help="where DECODE_ON device decodes")
    parser.add_argument("--batch", type=int, default=16, help="images per batch")
    parser.add_argument("--workers", type=int, default=15, help="loader workers, for ceilings")
    parser.add_argument("--view-size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.data.startswith("jpeg:"):
        args.data = "folder:" + jpeg_folder(args.data, args.grain)
    files = [d["file_name"] for d in get_pretrain_dataset_dicts(args.data)]
    sizes = [os.path.getsize(f) for f in files]
    print(
        f"{len(files)} files from {args.data}, mean {np.mean(sizes) / 1e3:.0f} KB; "
        f"torch {torch.__version__}"
    )
    pillow_s = bench_moco_sample(files, args.view_size)
    bench_mappers(args.data, args.workers, args.batch)
    bench_device_side(args.data, args.device, args.batch, pillow_s)


if __name__ == "__main__":
    main()
