"""
Linear classification on frozen features: the MoCo protocol (He et al. 2020, Sec. 4.1; Chen et
al. 2020): a linear layer on average-pooled res5 (2048-d), SGD lr 30, momentum 0.9, no weight
decay, batch 256, 100 epochs, lr / 10 at epochs 60 and 80; training images RandomResizedCrop 224
+ flip, evaluation resize 256 / centre crop 224.

Two trainers share the recipe (:class:`LinearRecipe`):

* :func:`train_linear_protocol`: the protocol as published, with a fresh augmentation of every
  image in every epoch (the frozen backbone runs every step). On several processes the linear
  layer is a DDP model and the global batch is split over them.
* :func:`linear_probe`: the classifier trained on features extracted once without augmentation
  (minutes instead of hours; what the mini benchmark, the localization readout and the tests
  use). ``normalize="standardize"`` standardises every feature dimension with the training
  set's mean and std first (a parameter-free BatchNorm, as MAE's linear probe), which makes the
  learning rate mean the same thing for features of any scale (e.g. random init). The
  features may be memory-mapped shards on disk (:mod:`.feature_store`), read a minibatch or a
  block at a time; with ``distributed`` every process trains on its own shard (DDP).
"""

import logging
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.utils import comm
from torch import nn
from torch.utils.data import DataLoader

from ..engine.trainer import create_ddp_model_any_device
from .encoder import ReadoutEncoder
from .feature_store import global_sum, row_blocks, rows_per_block
from .features import ReadoutImages, eval_transform, extract_features, train_transform
from .knn import topk_hits

__all__ = [
    "LinearRecipe",
    "LinearClassifier",
    "fit_linear",
    "accuracy",
    "linear_probe",
    "train_linear_protocol",
]

logger = logging.getLogger(__name__)


@dataclass
class LinearRecipe:
    """The optimisation of the linear layer (defaults: the MoCo protocol)."""

    epochs: int = 100
    lr: float = 30.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 256  # global, over all processes
    milestones: Sequence[int] = (60, 80)  # epochs at which lr is divided by 10
    normalize: str = "none"  # "none" or "standardize" (per-dimension, training statistics)
    seed: int = 0

    def __post_init__(self):
        if self.normalize not in ("none", "standardize"):
            raise ValueError(f"normalize must be 'none' or 'standardize', got {self.normalize!r}")

    def as_dict(self) -> Dict:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d


class LinearClassifier(nn.Module):
    """``(x - mean) / std`` (identity unless standardised) followed by ``nn.Linear``."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.fc = nn.Linear(dim, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)  # as MoCo's linear classifier
        nn.init.zeros_(self.fc.bias)

    def standardize(self, mean: torch.Tensor, std: torch.Tensor):
        """Set the (dim,) mean and std that inputs are standardised with."""
        self.mean.copy_(mean)
        self.std.copy_(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, dim) -> (N, num_classes) logits."""
        return self.fc((x - self.mean) / self.std)


def _optimizer(model: nn.Module, recipe: LinearRecipe, steps_per_epoch: int):
    opt = torch.optim.SGD(
        model.parameters(),
        lr=recipe.lr,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
    )
    # Stepped once per iteration, so the milestones are given in iterations.
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, [m * steps_per_epoch for m in recipe.milestones], gamma=0.1
    )
    return opt, sched


class _Samples:
    """
    Cached features as samples: (N, D) or (N, G, D) (G candidates per sample), a tensor or a
    memory-mapped array (:mod:`.feature_store`); minibatches and blocks are read on demand.
    """

    def __init__(self, x):
        self.x = x
        self.dim = x.shape[-1]

    def __len__(self) -> int:
        return self.x.shape[0]

    def take(self, idx: torch.Tensor, device) -> torch.Tensor:
        """(b,) sample indices -> (b, D) or (b, G, D) float32 on ``device``."""
        if isinstance(self.x, np.ndarray):
            return torch.from_numpy(self.x[idx.numpy()]).to(device).float()
        return self.x[idx].to(device).float()

    def rows(self):
        """The features as (R, D) rows (a view)."""
        return self.x.reshape(-1, self.dim)


def _moments(samples: _Samples, distributed: bool):
    """Mean and (unbiased) std per dimension over all rows, of every process when
    ``distributed``: two passes of blocks, sums accumulated in float64."""
    rows = samples.rows()
    total = torch.zeros(samples.dim, dtype=torch.float64)
    for _, block in row_blocks(rows):
        total += block.sum(0, dtype=torch.float64)
    sums = {"n": np.array(rows.shape[0]), "sum": total.numpy()}
    sums = global_sum(sums) if distributed else sums
    n = max(1, int(sums["n"]))
    mean = torch.from_numpy(sums["sum"] / n).float()
    squares = torch.zeros(samples.dim, dtype=torch.float64)
    for _, block in row_blocks(rows):
        squares += (block - mean).square_().sum(0, dtype=torch.float64)
    sq = global_sum({"sq": squares.numpy()})["sq"] if distributed else squares.numpy()
    std = torch.from_numpy(np.sqrt(sq / max(1, n - 1))).float()
    return mean, std.clamp_min(1e-6)


def _steps(n_local: int, recipe: LinearRecipe, distributed: bool):
    """(batch per process, steps per epoch): every process takes the same number of full
    batches from its own samples."""
    world = comm.get_world_size() if distributed else 1
    if recipe.batch_size % world:
        raise ValueError(f"batch size {recipe.batch_size} is not divisible by {world} processes")
    n_min = min(comm.all_gather(n_local)) if world > 1 else n_local
    if n_min == 0:
        raise ValueError("A process has no training samples (more processes than samples).")
    batch = min(recipe.batch_size // world, n_min)
    return batch, n_min // batch


def fit_linear(
    x,
    y,
    num_classes: int,
    recipe: LinearRecipe,
    distributed: bool = False,
    device="cpu",
) -> LinearClassifier:
    """
    Train a linear classifier on cached features.

    Args:
        x: (N, D) float features, or (N, G, D): G candidates per sample, scored by one shared
            linear function and normalised with a softmax over the G (``num_classes`` must be
            1; the label is the index of the right candidate). A tensor or a memory-mapped
            array: minibatches are read from it.
        y: (N,) int64 labels (anything indexed by a (b,) int64 tensor).
        distributed: every process calls this with its own shard of the samples; the layer is
            a DDP model, each step takes ``batch_size / world`` samples from every process.
        device: where the layer is trained.
    Returns:
        the trained :class:`LinearClassifier` (on the CPU, eval mode; the same in every process).
    """
    samples = _Samples(x)
    rank = comm.get_rank() if distributed else 0
    g = torch.Generator().manual_seed(recipe.seed + 1_000_003 * rank)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        head = LinearClassifier(samples.dim, num_classes)
    if recipe.normalize == "standardize":
        head.standardize(*_moments(samples, distributed))
    batch, steps = _steps(len(samples), recipe, distributed)
    head = head.to(device)
    model = create_ddp_model_any_device(head, broadcast_buffers=False) if distributed else head
    opt, sched = _optimizer(model, recipe, steps)
    for _ in range(recipe.epochs):
        order = torch.randperm(len(samples), generator=g)
        for i in range(steps):
            idx = order[i * batch : (i + 1) * batch]
            target = torch.as_tensor(y[idx], dtype=torch.long).to(device)
            loss = F.cross_entropy(_logits(model, samples.take(idx, device)), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"The linear classifier diverged (loss {loss.item()}) at lr {recipe.lr}: lower "
                "the learning rate or standardise the features (normalize='standardize')."
            )
    return head.cpu().eval()


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, C); (N, G, D) -> (N, G) scores of the G candidates."""
    return model(x) if x.dim() == 2 else model(x).squeeze(-1)


@torch.no_grad()
def accuracy(model: nn.Module, x, y, distributed: bool = False, device="cpu") -> Dict[str, float]:
    """
    Top-1 (and top-5 with more than 5 classes) accuracy (%) of ``model`` on (N, D) or (N, G, D)
    features (a tensor or a memory-mapped array), read in blocks; over the shards of all
    processes when ``distributed``.
    """
    samples, model = _Samples(x), model.to(device)
    block = rows_per_block(4 * int(np.prod(samples.x.shape[1:])))
    hits = {"n": np.array(len(samples)), "top1": np.array(0), "top5": np.array(0)}
    classes = 0
    for start in range(0, len(samples), block):
        idx = torch.arange(start, min(start + block, len(samples)))
        scores = _logits(model, samples.take(idx, device)).cpu()
        labels = torch.as_tensor(y[idx], dtype=torch.long)
        classes = scores.shape[1]
        for k in (1, 5):
            hits[f"top{k}"] = hits[f"top{k}"] + topk_hits(scores, labels, k)
    hits = global_sum(hits) if distributed else hits
    classes = max(comm.all_gather(classes)) if distributed else classes
    n = max(1, int(hits["n"]))
    out = {"top1": 100.0 * int(hits["top1"]) / n}
    if classes > 5:
        out["top5"] = 100.0 * int(hits["top5"]) / n
    return out


def linear_probe(
    train_x,
    train_y,
    val_x,
    val_y,
    num_classes: int,
    recipe: LinearRecipe,
    distributed: bool = False,
    device="cpu",
) -> Dict[str, float]:
    """
    Fit on cached training features, evaluate on validation features: {"top1", "top5"} (%).
    Features and labels as :func:`fit_linear` (``distributed``: every process passes its shards).
    """
    model = fit_linear(train_x, train_y, num_classes, recipe, distributed, device)
    return accuracy(model, val_x, val_y, distributed, device)


# ------------------------------------------------------------------------------------------
# The published protocol: augmented images, frozen backbone in the loop
# ------------------------------------------------------------------------------------------
class _EpochOrder(torch.utils.data.Sampler):
    """This process's slice of a permutation shared by all processes (same seed and epoch);
    every process gets the same number of full batches."""

    def __init__(self, n: int, batch_per_rank: int, seed: int):
        self.n, self.batch, self.seed, self.epoch = n, batch_per_rank, seed, 0
        self.world, self.rank = comm.get_world_size(), comm.get_rank()
        self.steps = n // (batch_per_rank * self.world)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(self.n, generator=g)[: self.steps * self.batch * self.world]
        return iter(order.view(self.steps, self.world, self.batch)[:, self.rank].flatten().tolist())

    def __len__(self):
        return self.steps * self.batch


def _resume(checkpoint: Optional[str], parts: Dict, recipe: LinearRecipe) -> int:
    """Load ``parts`` (name -> object with ``load_state_dict``) from ``checkpoint`` if it
    exists; returns the epoch to start from (0 without a checkpoint)."""
    if not (checkpoint and os.path.isfile(checkpoint)):
        return 0
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if state.get("recipe") != recipe.as_dict():
        raise ValueError(f"{checkpoint} was written with another recipe; delete it to restart.")
    for name, part in parts.items():
        part.load_state_dict(state[name])
    logger.info(f"Resumed the linear classifier from {checkpoint} at epoch {state['epoch']}")
    return state["epoch"]


def _save(checkpoint: str, parts: Dict, recipe: LinearRecipe, epoch: int):
    """Write ``parts`` and the number of finished epochs to ``checkpoint`` (atomic rename)."""
    state = {name: part.state_dict() for name, part in parts.items()}
    tmp = checkpoint + ".tmp"
    torch.save({**state, "epoch": epoch, "recipe": recipe.as_dict()}, tmp)
    os.replace(tmp, checkpoint)


def train_linear_protocol(
    encoder: ReadoutEncoder,
    train_records: List[Dict],
    train_labels: np.ndarray,
    val_records: List[Dict],
    val_labels: np.ndarray,
    num_classes: int,
    recipe: LinearRecipe,
    crop: int = 224,
    resize: int = 256,
    num_workers: int = 4,
    checkpoint: Optional[str] = None,
) -> Dict[str, float]:
    """
    The linear classification protocol with augmentation in every epoch (see module doc).

    Args:
        checkpoint: a file where the linear layer, optimizer and epoch are saved after every
            epoch, and resumed from when it exists (long ImageNet runs).
    Returns:
        {"top1", "top5"} (%) on the validation set (every process).
    """
    world = comm.get_world_size()
    if recipe.batch_size % world:
        raise ValueError(f"batch size {recipe.batch_size} is not divisible by {world} processes")
    if recipe.normalize != "none":
        raise ValueError("The augmented protocol trains on raw features (normalize='none').")
    dim = encoder(torch.zeros(1, 3, crop, crop, dtype=torch.uint8))["res5"].shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        head = LinearClassifier(dim, num_classes).to(encoder.device)
    sampler = _EpochOrder(len(train_records), recipe.batch_size // world, recipe.seed)
    if sampler.steps == 0:
        raise ValueError(f"{len(train_records)} training images: fewer than one batch.")
    loader = DataLoader(
        ReadoutImages(train_records, train_transform(crop)),
        sampler=sampler,
        batch_size=recipe.batch_size // world,
        num_workers=num_workers,
        drop_last=True,
        persistent_workers=False,
    )
    model = create_ddp_model_any_device(head, broadcast_buffers=False)
    opt, sched = _optimizer(model, recipe, sampler.steps)
    labels = torch.as_tensor(train_labels, dtype=torch.long)
    parts = {"head": head, "optimizer": opt, "scheduler": sched}
    for epoch in range(_resume(checkpoint, parts, recipe), recipe.epochs):
        sampler.epoch = epoch
        for images, index in loader:
            feats = encoder(images)["res5"]
            loss = F.cross_entropy(model(feats), labels[index].to(feats.device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        logger.info(
            f"linear epoch {epoch + 1}/{recipe.epochs}: loss {loss.item():.3f}, "
            f"lr {sched.get_last_lr()[0]:g}"
        )
        if checkpoint and comm.is_main_process():
            _save(checkpoint, parts, recipe, epoch + 1)
    # Every process scores its shard of the validation images.
    val = extract_features(
        encoder,
        val_records,
        eval_transform(resize, crop),
        num_workers=num_workers,
        gather=False,
        name="val",
    )
    labels = torch.as_tensor(val_labels, dtype=torch.long)[val["index"]]
    return accuracy(head.eval(), val["res5"], labels, distributed=True, device=encoder.device)
