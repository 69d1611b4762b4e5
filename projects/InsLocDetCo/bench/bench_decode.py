#!/usr/bin/env python
"""
JPEG decoding throughput for pretraining, as ratios to PIL's full decode in the same process.

    python bench/bench_decode.py --data jpeg:256                 # CPU decoders
    python bench/bench_decode.py --data jpeg:256 --device cuda   # + nvjpeg, batched

Per image, one thread (what one loader worker does): Pillow's full decode, the mappers' reader
``read_rgb_image`` (torchvision's decoder for baseline JPEGs since this benchmark), Pillow with
JPEG draft mode at the view size (``MAX_DECODE_SIZE`` 224: DCT-domain downscaling, only when
the image is at least twice the view), and ``torchvision.io.decode_jpeg`` on the CPU
(libjpeg-turbo). On a GPU: ``decode_jpeg(...,
device="cuda")`` on batches of file bytes (nvjpeg), where a loader worker would only read bytes.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.io import ImageReadMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_e2e import write_jpeg_folder  # noqa: E402

from insloc_detco.data import get_pretrain_dataset_dicts  # noqa: E402
from insloc_detco.data.reading import read_rgb_image  # noqa: E402


def pillow_decode(file_name: str) -> torch.Tensor:
    """What the mappers' reader did before it used torchvision for baseline JPEGs."""
    with Image.open(file_name) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def per_image_rate(fn, files, repeats=2) -> float:
    fn(files[0])
    start = time.perf_counter()
    for _ in range(repeats):
        for f in files:
            fn(f)
    return repeats * len(files) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="jpeg:256")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--view-size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.data.startswith("jpeg:"):
        root = f"/tmp/bench_e2e_jpeg_{args.data[5:]}"
        if not os.path.isdir(root):
            write_jpeg_folder(root, int(args.data[5:]))
        args.data = f"folder:{root}"
    files = [d["file_name"] for d in get_pretrain_dataset_dicts(args.data)]
    datas = {f: open(f, "rb").read() for f in files}
    rows = [
        ("Pillow decode -> (3, H, W) tensor", pillow_decode),
        ("read_rgb_image (the mappers' reader)", lambda f: read_rgb_image(f)),
        (f"PIL draft mode (MAX_DECODE_SIZE {args.view_size})",
         lambda f: read_rgb_image(f, max_size=args.view_size)),
        ("torchvision decode_jpeg, CPU", lambda f: torchvision.io.decode_jpeg(
            torch.frombuffer(datas[f], dtype=torch.uint8), mode=ImageReadMode.RGB)),
        ("read file bytes only", lambda f: open(f, "rb").read()),
    ]  # fmt: skip
    print(f"{len(files)} files from {args.data}, one CPU thread")
    base = None
    for name, fn in rows:
        rate = per_image_rate(fn, files)
        base = base or rate
        print(f"{name:<44} {rate:9.1f} img/s  x{rate / base:6.2f}")
    if args.device.startswith("cuda"):
        tensors = [torch.frombuffer(datas[f], dtype=torch.uint8) for f in files]
        batches = [tensors[i : i + args.batch] for i in range(0, len(tensors), args.batch)]
        torchvision.io.decode_jpeg(batches[0], device=args.device)  # warm up nvjpeg
        torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in batches * 2:
            torchvision.io.decode_jpeg(batch, device=args.device, mode=ImageReadMode.RGB)
        torch.cuda.synchronize()
        rate = 2 * len(tensors) / (time.perf_counter() - start)
        print(f"{'nvjpeg decode_jpeg(device=cuda), batch ' + str(args.batch):<44} "
              f"{rate:9.1f} img/s  x{rate / base:6.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
