"""
Frozen features of a labelled data set, extracted once and shared by the readouts.

Each process (``detectron2.engine.launch``: one per GPU, or several CPU processes over gloo)
reads the records ``rank, rank + world, ...``; the features are then all-gathered with
``detectron2.utils.comm`` and put back in record order, or kept as the local shard (the kNN
memory bank of a large training set never has to fit on one process).
"""

import logging
import time
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.utils import comm
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from ..data.reading import UnreadableImageError, read_rgb_image
from .encoder import ReadoutEncoder, ReadoutError

__all__ = [
    "eval_transform",
    "train_transform",
    "ReadoutImages",
    "image_batches",
    "shard",
    "extract_features",
    "gather_shards",
]

logger = logging.getLogger(__name__)


def eval_transform(resize: int, crop: int):
    """Resize the shorter side to ``resize``, centre crop ``crop`` (MoCo's 256 / 224)."""
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(crop)])


def train_transform(crop: int):
    """RandomResizedCrop ``crop`` (scale 0.08-1, torchvision's default) + horizontal flip."""
    return v2.Compose([v2.RandomResizedCrop(crop, antialias=True), v2.RandomHorizontalFlip()])


class ReadoutImages(Dataset):
    """``records[indices[i]]`` decoded to (3, H, W) uint8 RGB, transformed: (image, index).
    ``seed``: a random ``transform`` draws record ``index``'s parameters from the torch seed
    ``seed + index``, the same in any process, loader worker or batch order."""

    def __init__(self, records: List[Dict], transform, indices: Optional[Sequence[int]] = None,
                 seed: Optional[int] = None):  # fmt: skip
        self.records = records
        self.transform = transform
        self.indices = list(range(len(records))) if indices is None else list(indices)
        self.seed = seed

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        index = self.indices[i]
        file_name = self.records[index]["file_name"]
        try:
            image = read_rgb_image(file_name)
        except UnreadableImageError as e:
            # A readout's score is over the whole set: skipping an image would change it.
            raise ReadoutError(f"Cannot read an image of the readout data set: {e}") from None
        if self.seed is None:
            return self.transform(image), index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + index)
            return self.transform(image), index


def image_batches(records: List[Dict], transform, batch_size: int, num_workers: int = 0):
    """Yields (N, 3, H, W) uint8 batches of ``records`` in order (every process: all of them)."""
    loader = DataLoader(ReadoutImages(records, transform), batch_size=batch_size,
                        num_workers=num_workers)  # fmt: skip
    for images, _ in loader:
        yield images


def shard(n: int) -> range:
    """This process's share of ``n`` records: ``rank, rank + world, ...``."""
    return range(comm.get_rank(), n, comm.get_world_size())


def gather_shards(local: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """
    All-gather every process's ``{"index": (n_r,), name: (n_r, ...)}`` and sort by index.
    Features with several rows per record (e.g. "boxes": n_r x M rows) keep their M rows
    together. Every process gets the whole set.
    """
    parts = comm.all_gather(local)
    index = torch.cat([p["index"] for p in parts])
    order = torch.argsort(index)
    out = {"index": index[order]}
    for k in local:
        if k == "index":
            continue
        cat = torch.cat([p[k] for p in parts])
        rows = cat.shape[0] // max(1, index.numel())
        out[k] = cat.view(index.numel(), rows, *cat.shape[1:])[order].flatten(0, 1)
        if rows == 1:
            out[k] = out[k].view(index.numel(), *cat.shape[1:])
    return out


@torch.no_grad()
def extract_features(
    encoder: ReadoutEncoder,
    records: List[Dict],
    transform,
    stages: Sequence[str] = ("res5",),
    boxes: Optional[torch.Tensor] = None,
    batch_size: int = 64,
    num_workers: int = 2,
    gather: bool = True,
    name: str = "",
    seed: Optional[int] = None,
) -> Dict[str, torch.Tensor]:
    """
    Args:
        encoder: the frozen network.
        records: data set records (``file_name``).
        transform: the image transform (e.g. :func:`eval_transform`); every output must have
            the same size when ``boxes`` is given.
        stages: stages whose average-pooled features are returned.
        boxes: (M, 4) XYXY boxes, the same in every (transformed) image; their per-box features
            are returned as "boxes", M rows per record.
        gather: all-gather to every process in record order; False: this process's shard.
        name: for the log.
        seed: for a random ``transform``, see :class:`ReadoutImages`.
    Returns:
        {"index": (n,) record indices, stage: (n, C), "boxes": (n * M, D)}: float32 on the CPU.
    """
    indices = shard(len(records))
    loader = DataLoader(
        ReadoutImages(records, transform, indices, seed),
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle=False,
    )
    out: Dict[str, List[torch.Tensor]] = {"index": []}
    start, done = time.perf_counter(), 0
    for images, index in loader:
        per_image = None if boxes is None else [boxes] * len(images)
        features = encoder(images, stages=stages, boxes=per_image)
        out["index"].append(index)
        for k, v in features.items():
            out.setdefault(k, []).append(v.float().cpu())
        done += len(images)
        if len(loader) > 10 and (done // batch_size) % max(1, len(loader) // 5) == 0:
            logger.info(f"[{name}] features of {done}/{len(indices)} images "
                        f"({done / (time.perf_counter() - start):.1f} img/s)")  # fmt: skip
    local = {k: torch.cat(v) if v else torch.empty(0) for k, v in out.items()}
    if not out["index"]:  # more processes than records
        local["index"] = torch.empty(0, dtype=torch.long)
    return gather_shards(local) if gather else local
