"""
Frozen features of a labelled data set, extracted once and shared by the readouts.

Each process (``detectron2.engine.launch``: one per GPU, or several CPU processes over gloo)
reads the records ``rank, rank + world, ...``. The features of a small set (VOC07, the views)
are then gathered with ``detectron2.utils.comm`` and put back in record order
(:func:`extract_features`); those of a large one (ImageNet) stay with their process, on disk
(:func:`extract_shard`, :mod:`.feature_store`), and the readouts work on the shards.
"""

import logging
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.utils import comm
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from ..data.reading import UnreadableImageError, read_rgb_image
from .encoder import ReadoutEncoder, ReadoutError
from .feature_store import FeatureShard, FeatureStore

__all__ = [
    "eval_transform",
    "train_transform",
    "ReadoutImages",
    "image_batches",
    "shard",
    "feature_batches",
    "extract_features",
    "extract_shard",
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
    ``seed + index``, the same in any process, loader worker or batch order.

    Only the file names of ``indices`` are kept, in one numpy array: loader workers that read
    them do not copy a list of Python objects page by page (the copy-on-read growth of forked
    workers), whatever the size of the data set."""

    def __init__(
        self,
        records: List[Dict],
        transform,
        indices: Optional[Sequence[int]] = None,
        seed: Optional[int] = None,
    ):
        self.transform = transform
        self.indices = np.arange(len(records)) if indices is None else np.asarray(indices)
        self.file_names = np.array([records[i]["file_name"].encode() for i in self.indices])
        self.seed = seed

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        index = int(self.indices[i])
        file_name = self.file_names[i].decode()
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
    loader = DataLoader(
        ReadoutImages(records, transform), batch_size=batch_size, num_workers=num_workers
    )
    for images, _ in loader:
        yield images


def shard(n: int) -> range:
    """This process's share of ``n`` records: ``rank, rank + world, ...``."""
    return range(comm.get_rank(), n, comm.get_world_size())


def gather_shards(local: Dict[str, torch.Tensor], dst: Optional[int] = None) -> Dict:
    """
    Gather every process's ``{"index": (n_r,), name: (n_r, ...)}`` and sort by index.
    Features with several rows per record (e.g. "boxes": n_r x M rows) keep their M rows
    together.

    Args:
        dst: None: every process gets the whole set; a rank: only that process does (the
            others get {}).
    """
    parts = comm.all_gather(local) if dst is None else comm.gather(local, dst=dst)
    if not parts:
        return {}
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


class _Progress:
    """A log line every ``every`` seconds while a process extracts, and at the end of a long
    extraction."""

    def __init__(self, name: str, total: int, every: float = 60.0):
        self.name, self.total, self.every = name, total, every
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, n: int):
        self.done += n
        now = time.perf_counter()
        finished = self.done >= self.total and now - self.start > 10.0
        if now - self.last < self.every and not finished:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        left = (self.total - self.done) / max(rate, 1e-9)
        logger.info(
            f"[{self.name}] features of {self.done}/{self.total} images in this process "
            f"({rate:.1f} img/s, {left / 60:.0f} min left)"
        )


# forward(encoder, images) -> {feature: (N * rows, D)}; None: encoder(images, stages, boxes).
Forward = Optional[Callable[[ReadoutEncoder, torch.Tensor], Dict[str, torch.Tensor]]]


@torch.no_grad()
def feature_batches(
    encoder: ReadoutEncoder,
    records: List[Dict],
    transform,
    stages: Sequence[str] = ("res5",),
    boxes: Optional[torch.Tensor] = None,
    batch_size: int = 64,
    num_workers: int = 2,
    name: str = "",
    seed: Optional[int] = None,
    forward: Forward = None,
) -> Iterator[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
    """
    Features of this process's records, batch by batch, with a progress line.

    Args:
        encoder: the frozen network.
        records: data set records (``file_name``).
        transform: the image transform (e.g. :func:`eval_transform`); every output must have
            the same size when ``boxes`` is given.
        stages: stages whose average-pooled features are returned.
        boxes: (M, 4) XYXY boxes, the same in every (transformed) image; their per-box features
            are returned as "boxes", M rows per record.
        name: for the log.
        seed: for a random ``transform``, see :class:`ReadoutImages`.
        forward: another feature function of the encoder (e.g. DetCo's per-stage pooling).
    Yields:
        ((b,) record indices, {stage: (b, C), "boxes": (b * M, D)}) float32 on the CPU.
    """
    indices = shard(len(records))
    loader = DataLoader(
        ReadoutImages(records, transform, indices, seed),
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle=False,
    )
    progress = _Progress(name, len(indices))
    for images, index in loader:
        if forward is not None:
            features = forward(encoder, images)
        else:
            per_image = None if boxes is None else [boxes] * len(images)
            features = encoder(images, stages=stages, boxes=per_image)
        yield index, {k: v.float().cpu() for k, v in features.items()}
        progress.update(len(images))


def extract_features(
    encoder: ReadoutEncoder,
    records: List[Dict],
    transform,
    *args,
    gather: Union[bool, str] = True,
    **kwargs,
) -> Dict[str, torch.Tensor]:
    """
    The features of a small set, in memory (``args``, ``kwargs``: :func:`feature_batches`).

    Args:
        gather: True: all-gathered to every process in record order; "main": gathered to the
            main process only (the others get {}); False: this process's shard.
    Returns:
        {"index": (n,) record indices, stage: (n, C), "boxes": (n * M, D)}: float32 on the CPU.
    """
    out: Dict[str, List[torch.Tensor]] = {"index": []}
    batches = feature_batches(encoder, records, transform, *args, **kwargs)
    for index, features in batches:
        out["index"].append(index)
        for k, v in features.items():
            out.setdefault(k, []).append(v)
    local = {k: torch.cat(v) if v else torch.empty(0) for k, v in out.items()}
    if not out["index"]:  # more processes than records
        local["index"] = torch.empty(0, dtype=torch.long)
    if gather == "main":
        return gather_shards(local, dst=0)
    return gather_shards(local) if gather else local


def extract_shard(
    store: FeatureStore,
    encoder: ReadoutEncoder,
    records: List[Dict],
    transform,
    name: str,
    **kwargs,
) -> FeatureShard:
    """
    The features of this process's records, written to ``store`` and memory-mapped (every
    process calls it; ``kwargs``: :func:`feature_batches`).
    """
    batches = feature_batches(encoder, records, transform, name=name, **kwargs)
    return store.write(name, batches, len(shard(len(records))))
