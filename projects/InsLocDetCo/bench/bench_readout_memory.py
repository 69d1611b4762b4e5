#!/usr/bin/env python
"""
Peak host memory of the knn / linear --cached / loc readouts as the data set grows, measured in
a fresh process per run, for the features kept in per-process shards on disk (what
``eval_readout.py`` runs) against the same readout with the features held in memory (the
previous way; ``extract_features`` + the probes on tensors).

    python bench/bench_readout_memory.py                       # loc, 1000 and 4000 images
    python bench/bench_readout_memory.py --protocol knn --images 4000 --dim 2048
    python bench/bench_readout_memory.py --records 1281167     # ImageNet's record list alone

The network is a stub with the readout network's interface and output sizes (``--dim``
features per image and per cell, a fixed projection of mean colours) so that the measurement is
about the features, not the ResNet; images are generated 24 px PNGs. Printed per size: the peak
anonymous memory (RssAnon, sampled every 2 ms: the process's own heap, what a memory limit
counts first) and the peak resident size (VmHWM, which also counts the feature files' cached
pages), and the ratios of the 4x set to the 1x set.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from insloc_detco.readout.datasets import class_labels  # noqa: E402
from insloc_detco.readout.feature_store import FeatureStore  # noqa: E402
from insloc_detco.readout.features import (  # noqa: E402
    eval_transform,
    extract_features,
    extract_shard,
)
from insloc_detco.readout.knn import knn_accuracy  # noqa: E402
from insloc_detco.readout.linear import LinearRecipe, linear_probe  # noqa: E402
from insloc_detco.readout.localization import grid_boxes, localization_probe  # noqa: E402
from insloc_detco.readout.protocols import (  # noqa: E402
    ReadoutData,
    cell_metrics,
    knn_metrics,
    linear_metrics,
)

SIZE, CLASSES = 24, 8


class StubEncoder(torch.nn.Module):
    """The readout network's interface at little cost: a fixed random projection of the mean
    colour of each image (and of each box, with the box's position) to ``dim`` dimensions."""

    def __init__(self, dim: int, seed: int = 0):
        super().__init__()
        self.proj = torch.randn(7, dim, generator=torch.Generator().manual_seed(seed))

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, images, stages=("res5",), boxes=None):
        x = images.float() / 255
        side = x.shape[-1]
        n = len(x)
        out = {s: torch.cat([x.mean((2, 3)), torch.zeros(n, 4)], 1) @ self.proj for s in stages}
        if boxes is not None:
            rows = []
            for image, b in zip(x, boxes):
                for x0, y0, x1, y1 in b.long().tolist():
                    colour = image[:, y0:y1, x0:x1].mean((1, 2))
                    rows.append(torch.cat([colour, torch.tensor([x0, y0, x1, y1]) / side]))
            out["boxes"] = torch.stack(rows) @ self.proj
        return out


def write_class_folder(root: str, n: int, classes: int, size: int = SIZE, seed: int = 0):
    """``n`` random size x size PNGs in ``classes`` sub-folders; the class tints the image."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = i % classes
        os.makedirs(os.path.join(root, f"c{label}"), exist_ok=True)
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        image[..., label % 3] = (255 // classes) * label
        Image.fromarray(image).save(os.path.join(root, f"c{label}", f"{i:06d}.png"))


def _records(root: str):
    from insloc_detco.readout.datasets import _list_class_folder

    return _list_class_folder(root)[1]


class _Sampler(threading.Thread):
    """Peak RssAnon of this process, sampled every 2 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = 0, False

    def run(self):
        while not self.stop:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        self.peak = max(self.peak, int(line.split()[1]) * 1024)
            time.sleep(0.002)


def _readout(args, train, val, folder):
    enc, tf = StubEncoder(args.dim), eval_transform(SIZE, SIZE)
    recipe = LinearRecipe(
        epochs=2, lr=0.5, batch_size=256, milestones=(1,), normalize="standardize"
    )
    ytr, yva = torch.as_tensor(class_labels(train)), torch.as_tensor(class_labels(val))
    boxes = grid_boxes(SIZE, SIZE, 3) if args.protocol == "loc" else None
    kw = dict(boxes=boxes, batch_size=64, num_workers=0)
    if args.in_memory:
        ftr, fva = (extract_features(enc, r, tf, **kw) for r in (train, val))
        if args.protocol == "knn":
            return knn_accuracy(ftr["res5"], ytr, fva["res5"], yva, CLASSES, (20,))
        if args.protocol == "loc":
            return localization_probe(ftr["boxes"], fva["boxes"], 9, recipe)
        return linear_probe(ftr["res5"], ytr, fva["res5"], yva, CLASSES, recipe)
    # On disk: what eval_readout.py runs, the protocols' functions on the shards.
    data = ReadoutData(train, val, [f"c{i}" for i in range(CLASSES)], SIZE, SIZE)
    with FeatureStore(folder) as store:
        ftr, fva = (
            extract_shard(store, enc, r, tf, s, **kw) for r, s in ((train, "train"), (val, "val"))
        )
        if args.protocol == "knn":
            return knn_metrics(ftr, fva, data, (20,), 0.07, "cpu")
        if args.protocol == "loc":
            return {
                **cell_metrics(ftr, fva, data, 3, recipe),
                "Cls": linear_metrics(ftr, fva, data, recipe)["top1"],
            }
        return linear_metrics(ftr, fva, data, recipe)


def child(args):
    """One readout in this process; prints a JSON line of its peaks."""
    torch.set_num_threads(1)
    train, val = _records(args.train_dir), _records(args.val_dir)
    sampler = _Sampler()
    sampler.start()
    start = time.perf_counter()
    metrics = _readout(args, train, val, os.path.join(args.work, "features"))
    sampler.stop = True
    sampler.join()
    with open("/proc/self/status") as f:
        hwm = [int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")][0]
    print(
        json.dumps(
            {
                "anon": sampler.peak,
                "hwm": hwm,
                "seconds": time.perf_counter() - start,
                "metrics": metrics,
            }
        )
    )


def record_list_bytes(n: int):
    """Bytes of ``n`` ImageNet-like records (the data set's list of dicts) and of the file-name
    array a process's loader keeps for its shard of an 8-process run."""
    import tracemalloc

    from insloc_detco.readout.features import ReadoutImages

    tracemalloc.start()
    records = [
        {
            "file_name": f"/datasets/imagenet/train/n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG",
            "label": i % 1000,
            "image_id": i,
        }
        for i in range(n)
    ]
    listed = tracemalloc.get_traced_memory()[0]
    images = ReadoutImages(records, None, indices=range(0, n, 8))
    names = images.file_names.nbytes + images.indices.nbytes
    tracemalloc.stop()
    print(
        f"{n} records: {listed / 2**20:.0f} MiB as a list of dicts; one process's shard of 8 "
        f"in the loader: {names / 2**20:.1f} MiB"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--protocol", choices=("loc", "knn", "linear"), default="loc")
    p.add_argument("--images", type=int, default=1000, help="training images of the 1x set")
    p.add_argument("--dim", type=int, default=2048, help="features per image and per cell")
    p.add_argument("--records", type=int, default=0, help="> 0: measure a record list only")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--train-dir", help=argparse.SUPPRESS)
    p.add_argument("--val-dir", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.records:
        return record_list_bytes(args.records)
    if args.child:
        return child(args)
    rows = 10 if args.protocol == "loc" else 1
    print(
        f"{args.protocol}, {args.dim}-d, {rows} feature rows per image, 1 process, "
        f"{torch.__version__}"
    )
    print("| images (train + val) | features | kept | peak RssAnon | peak VmHWM | seconds |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench_readout_memory_") as work:
        peaks = {}
        for scale in (1, 4):
            n = args.images * scale
            dirs = [os.path.join(work, f"{split}{n}") for split in ("train", "val")]
            write_class_folder(dirs[0], n, CLASSES, seed=n)
            write_class_folder(dirs[1], n // 4, CLASSES, seed=n + 1)
            features = (n + n // 4) * rows * args.dim * 4
            for kept in ("in memory", "on disk"):
                cmd = [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--child",
                    "--protocol",
                    args.protocol,
                    "--dim",
                    str(args.dim),
                    "--train-dir",
                    dirs[0],
                    "--val-dir",
                    dirs[1],
                    "--work",
                    work,
                ]
                if kept == "in memory":
                    cmd.append("--in-memory")
                env = dict(os.environ, OMP_NUM_THREADS="1")
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                peaks[scale, kept] = r
                print(
                    f"| {n} + {n // 4} | {features / 2**20:.0f} MiB | {kept} | "
                    f"{r['anon'] / 2**20:.0f} MiB | {r['hwm'] / 2**20:.0f} MiB | "
                    f"{r['seconds']:.0f} |"
                )
        for kept in ("in memory", "on disk"):
            ratio = peaks[4, kept]["anon"] / peaks[1, kept]["anon"]
            disk, memory = peaks[4, kept]["metrics"], peaks[4, "in memory"]["metrics"]
            same = all(disk[k] == v for k, v in memory.items())
            print(
                f"{kept}: peak RssAnon 4x / 1x images = {ratio:.2f}"
                + ("" if kept == "in memory" else f"; same metrics as in memory: {same}")
            )


if __name__ == "__main__":
    main()
