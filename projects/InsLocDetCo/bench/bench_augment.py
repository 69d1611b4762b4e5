#!/usr/bin/env python
"""
Photometric augmentation speed, as ratios measured in one process.

    python bench/bench_augment.py                       # CPU: batch 8 at 224 px, loader costs
    python bench/bench_augment.py --device cuda --batch 64

1. **MoCo v2's photometric augmentation of a batch** (colour jitter p 0.8, grayscale p 0.2,
   blur k 23 p 0.5, flip) three ways: ours (``PhotometricAugmentation``: batched, per-sample
   parameters, separable blur), torchvision's ``transforms.v2`` per image (what the loader ran
   before), and Kornia's ``kornia.augmentation`` batch pipeline (if installed). Per-op timings
   of ours and torchvision's show where the time goes.
2. **Loader CPU-seconds per sample** (``--loader``, one thread, no workers: what one loader
   worker spends) for each method's mapper with the photometric part in the loader or on the
   device, against decoding and cropping alone (the floor any placement pays).
"""

import argparse
import itertools
import os
import sys
import time

import torch
from torchvision.transforms import v2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_pretrain import load_cfg  # noqa: E402

from insloc_detco.data import build_pretrain_mapper, get_pretrain_dataset_dicts  # noqa: E402
from insloc_detco.data import photometric as P  # noqa: E402
from insloc_detco.data.augmentation import (  # noqa: E402
    PhotometricAugmentation,
    blur_kernel_size,
    build_view_crop,
)
from insloc_detco.data.reading import read_rgb_image  # noqa: E402


def timeit(fn, device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs (GPU work included)."""
    times = []
    for i in range(warmup + repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def torchvision_pipeline(size: int):
    return v2.Compose(
        [
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(blur_kernel_size(size, 0.1), (0.1, 2.0))], p=0.5),
            v2.RandomHorizontalFlip(),
        ]
    )


def kornia_pipeline(size: int):
    try:
        import kornia.augmentation as K
    except ImportError:
        return None
    k = blur_kernel_size(size, 0.1)
    return torch.nn.Sequential(
        K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.RandomGaussianBlur((k, k), (0.1, 2.0), p=0.5),
        K.RandomHorizontalFlip(),
    )


def bench_batch(device: str, batch: int, size: int, repeats: int):
    x8 = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    xf = x8.float() / 255
    ours = PhotometricAugmentation().to(device)
    tv = torchvision_pipeline(size)
    rows = [("ours, batched (uint8 in, float out)", lambda: ours(x8))]
    rows.append(("torchvision v2, per image (uint8)", lambda: [tv(img) for img in x8]))
    kornia = kornia_pipeline(size)
    if kornia is not None:
        kornia = kornia.to(device)
        rows.append(("kornia.augmentation, batched (float)", lambda: kornia(xf)))
    print(f"\n== MoCo v2 photometric augmentation, batch {batch} x 3 x {size}^2 on {device} ==")
    base = None
    for name, fn in rows:
        t = timeit(fn, device, repeats)
        base = base or t
        print(f"{name:<40} {t * 1e3:9.2f} ms  {batch / t:9.0f} img/s  x{t / base:6.2f} of ours")
    # Where the time goes: each op on the whole batch, ours against torchvision per image.
    k = blur_kernel_size(size, 0.1)
    f = torch.full((batch,), 1.2, device=device)
    h = torch.full((batch,), 0.05, device=device)
    s = torch.full((batch,), 1.5, device=device)
    ops = [
        (
            "brightness",
            lambda: P.adjust_brightness(xf, f),
            lambda img: v2.functional.adjust_brightness(img, 1.2),
        ),
        (
            "contrast",
            lambda: P.adjust_contrast(xf, f),
            lambda img: v2.functional.adjust_contrast(img, 1.2),
        ),
        (
            "saturation",
            lambda: P.adjust_saturation(xf, f),
            lambda img: v2.functional.adjust_saturation(img, 1.2),
        ),
        ("hue", lambda: P.adjust_hue(xf, h), lambda img: v2.functional.adjust_hue(img, 0.05)),
        (
            "grayscale",
            lambda: P.to_grayscale(xf),
            lambda img: v2.functional.rgb_to_grayscale(img, 3),
        ),
        (
            f"blur k={k}",
            lambda: P.gaussian_blur(xf, k, s),
            lambda img: v2.functional.gaussian_blur(img, [k, k], [1.5, 1.5]),
        ),
    ]
    header = f"{'op (float, whole batch)':<24} {'ours ms':>9} {'torchvision ms':>15}"
    print(f"{header} {'tv / ours':>10}")
    for name, ours_fn, tv_fn in ops:
        t_ours = timeit(ours_fn, device, repeats)
        t_tv = timeit(lambda: [tv_fn(img) for img in xf], device, max(1, repeats // 2))
        print(f"{name:<24} {t_ours * 1e3:9.2f} {t_tv * 1e3:15.2f} {t_tv / t_ours:10.1f}")


CONFIGS = {
    "MoCoV2": "pretrain_moco_v2.yaml",
    "InsLocFPN": "pretrain_insloc_fpn.yaml",
    "DetCo": "pretrain_detco.yaml",
}


def decode_and_crop(cfg, mapper, photometric=None):
    """
    What any placement must do per sample: the decodes and the per-view resizes. With
    ``photometric`` (a per-view transform), also what the loader did before this pipeline:
    torchvision's per-image augmentation of every view.
    """
    p = cfg.INPUT.PRETRAIN
    crop = build_view_crop(cfg)
    name = cfg.MODEL.META_ARCHITECTURE
    finish = photometric or (lambda view: view)

    def run(d):
        image = read_rgb_image(d["file_name"], p.MIN_IMAGE_SIZE, p.MAX_DECODE_SIZE)
        if name == "InsLocFPN":  # 2 foreground crops + 2 backgrounds (two more decodes)
            for _ in range(2):
                mapper.foreground(image)
                background = read_rgb_image(d["file_name"], p.MIN_IMAGE_SIZE, p.MAX_DECODE_SIZE)
                finish(mapper.resize(background))
        else:
            finish(crop(image)), finish(crop(image))
            if name == "DetCo":
                for _ in range(2):
                    finish(mapper.jigsaw.crop(image)["crop"])

    return run


def bench_loader(data: str, samples: int):
    """CPU-seconds per sample of one loader worker (one thread, process CPU time)."""
    torch.set_num_threads(1)
    print(f"\n== Loader CPU-seconds per sample (one thread), data {data} ==")
    print(
        f"{'method':<10} {'decode+crop':>12} {'device placement':>18} {'loader placement':>18} "
        f"{'before (torchvision)':>21}"
    )
    for name, config in CONFIGS.items():
        times = {}
        for where in ("device", "loader"):
            cfg = load_cfg(
                config,
                [
                    "DATASETS.TRAIN",
                    f"('{data}',)",
                    "MODEL.DEVICE",
                    "cpu",
                    "INPUT.PRETRAIN.AUGMENT_ON",
                    where,
                ],
            )
            dicts = get_pretrain_dataset_dicts(cfg.DATASETS.TRAIN)
            mapper = build_pretrain_mapper(cfg, dicts)
            if where == "device":
                times["base"] = _cpu_per_sample(decode_and_crop(cfg, mapper), dicts, samples)
                tv = torchvision_pipeline(cfg.INPUT.PRETRAIN.CROP_SIZE)
                before = decode_and_crop(cfg, mapper, tv)
                times["before"] = _cpu_per_sample(before, dicts, samples)
            times[where] = _cpu_per_sample(mapper, dicts, samples)
        b = times["base"]
        cells = [f"{times[k] * 1e3:8.1f} ms x{times[k] / b:4.2f}" for k in ("device", "loader")]
        cells.append(f"{times['before'] * 1e3:8.1f} ms x{times['before'] / b:4.2f}")
        print(f"{name:<10} {b * 1e3:9.1f} ms {cells[0]:>18} {cells[1]:>18} {cells[2]:>21}")


def _cpu_per_sample(fn, dicts, samples: int) -> float:
    records = list(itertools.islice(itertools.cycle(dicts), samples + 2))
    for d in records[:2]:
        fn(d)
    start = time.process_time()
    for d in records[2:]:
        fn(d)
    return (time.process_time() - start) / samples


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loader", action="store_true", help="also measure loader CPU costs")
    parser.add_argument(
        "--data", default="pretrain_demo", help="dataset for --loader, or jpeg:N (generated)"
    )
    parser.add_argument("--samples", type=int, default=20, help="samples per loader figure")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    bench_batch(args.device, args.batch, args.size, args.repeats)
    if args.loader:
        if args.data.startswith("jpeg:"):  # ImageNet-sized JPEGs, made once (bench_e2e.py)
            from bench_e2e import write_jpeg_folder

            root = f"/tmp/bench_e2e_jpeg_{args.data[5:]}"
            if not os.path.isdir(root):
                write_jpeg_folder(root, int(args.data[5:]))
            args.data = f"folder:{root}"
        bench_loader(args.data, args.samples)


if __name__ == "__main__":
    main()
