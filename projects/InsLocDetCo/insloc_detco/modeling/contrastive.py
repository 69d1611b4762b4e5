"""Contrastive machinery shared by every method: queue, InfoNCE, momentum update, shuffle-BN.

Device- and world-size-agnostic: tensors stay on the device they come in on, and every
collective has a single-process fast path, so the same code runs in a unit test on CPU, on one
GPU without a launcher, and on many nodes.
"""

from typing import Callable, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.utils import comm
from torch import nn

__all__ = [
    "concat_all_gather",
    "ContrastiveQueue",
    "broadcast_queues",
    "info_nce",
    "contrastive_accuracy",
    "momentum_update",
    "batch_shuffle",
    "batch_unshuffle",
    "encode_with_shuffle_bn",
]


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """
    Concatenate ``tensor`` from all ranks along dim 0 (no gradient). All ranks must pass the
    same shape. With one process, returns ``tensor`` itself.
    """
    if comm.get_world_size() == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(comm.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


class ContrastiveQueue(nn.Module):
    """
    A FIFO memory bank of ``size`` L2-normalised keys of dimension ``dim``.

    The keys are a buffer (saved in checkpoints, moved with ``.to()``, never trained). Every rank
    writes the keys of all ranks (``ContrastivePretrainer.enqueue_keys`` gathers them for all
    queues at once), so every rank holds the same queue. The write position wraps around, so
    ``size`` need not be a multiple of the global batch.
    """

    def __init__(self, dim: int, size: int):
        super().__init__()
        self.size = size
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def write(self, keys: torch.Tensor):
        """
        Args:
            keys: (M, dim) keys of all ranks (the caller gathers them), written at the write
                position; device ops only, no host sync.
        """
        n = keys.shape[0]
        if n > self.size:  # only the newest `size` keys can be kept
            keys, n = keys[-self.size :], self.size
        index = (self.ptr + torch.arange(n, device=self.keys.device)) % self.size
        self.keys[index] = keys.to(self.keys.dtype)
        self.ptr.copy_((self.ptr + n) % self.size)

    def extra_repr(self):
        return f"size={self.size}, dim={self.keys.shape[1]}"


@torch.no_grad()
def broadcast_queues(model: nn.Module, src: int = 0) -> int:
    """
    Make every :class:`ContrastiveQueue` of ``model`` (keys and write position) a copy of rank
    ``src``'s, as DDP does for the parameters when it wraps a model. Without it each rank starts
    from its own random keys (DDP with ``broadcast_buffers=False`` leaves buffers alone), and
    the ranks' negatives differ until the queue has been overwritten once. A no-op with one
    process; every rank must call it.

    Returns:
        the number of queues.
    """
    queues = [m for m in model.modules() if isinstance(m, ContrastiveQueue)]
    if comm.get_world_size() > 1:
        for queue in queues:
            dist.broadcast(queue.keys, src)
            dist.broadcast(queue.ptr, src)
    return len(queues)


def info_nce(
    q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    InfoNCE (MoCo Eq. 1): -log exp(q.k+/T) / (exp(q.k+/T) + sum_neg exp(q.k-/T)).

    Args:
        q: (N, D) L2-normalised queries.
        k: (N, D) L2-normalised positive keys (no gradient needed).
        negatives: (K, D) L2-normalised negative keys.
        temperature: T.

    Returns:
        loss: scalar, mean over the N queries.
        logits: (N, 1 + K); column 0 holds the positive.
    """
    l_pos = torch.einsum("nd,nd->n", q, k).unsqueeze(-1)
    l_neg = q @ negatives.to(q.dtype).t()
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits.float(), labels), logits


@torch.no_grad()
def contrastive_accuracy(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy (%) of picking the positive (column 0) among the 1 + K candidates."""
    return (logits.argmax(dim=1) == 0).float().mean() * 100.0


@torch.no_grad()
def momentum_update(query: nn.Module, key: nn.Module, m: float):
    """
    theta_k <- m * theta_k + (1 - m) * theta_q for all parameters (MoCo Eq. 2). Buffers (BN
    running statistics) are the key encoder's own, as in MoCo.
    """
    # Under no_grad the query's parameters are read as they are: no detach() per tensor
    # (one dispatched operator each, ~160 per step for a ResNet-50).
    q_params = list(query.parameters())
    k_params = list(key.parameters())
    assert len(q_params) == len(k_params), "query and key encoders differ"
    torch._foreach_mul_(k_params, m)
    torch._foreach_add_(k_params, q_params, alpha=1.0 - m)


@torch.no_grad()
def batch_shuffle(*xs: torch.Tensor) -> Tuple[Tuple[torch.Tensor, ...], torch.Tensor]:
    """
    Gather the tensors ``xs`` (each (N, ...), same N) from all ranks, apply one random
    permutation of the global batch (drawn on rank 0 and broadcast) to all of them, and return
    this rank's slice.

    Returns:
        xs_shuffled: tuple of (N, ...) tensors, this rank's part of the shuffled global batch.
        idx_unshuffle: (N * world,) permutation that undoes the shuffle.
    """
    xs_all = [concat_all_gather(x) for x in xs]
    idx_shuffle = torch.randperm(xs_all[0].shape[0], device=xs[0].device)
    if comm.get_world_size() > 1:
        dist.broadcast(idx_shuffle, src=0)
    n, rank = xs[0].shape[0], comm.get_rank()
    mine = idx_shuffle[rank * n : (rank + 1) * n]
    return tuple(x_all[mine] for x_all in xs_all), torch.argsort(idx_shuffle)


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`batch_shuffle` for an encoder output ``x`` (N, ...)."""
    x_all = concat_all_gather(x)
    n, rank = x.shape[0], comm.get_rank()
    return x_all[idx_unshuffle[rank * n : (rank + 1) * n]]


@torch.no_grad()
def encode_with_shuffle_bn(encoder: Callable, *xs: torch.Tensor, single_process_splits: int = 1):
    """
    Run the key ``encoder`` so that BatchNorm never sees a query and its key in the same batch
    statistics (MoCo Sec. 3.3, "Shuffling BN").

    Several ranks: shuffle across ranks, encode, unshuffle. One process: there is no other rank,
    so permute the batch and encode it in ``single_process_splits`` chunks, each with its own BN
    statistics, then restore the order (split-batch emulation; 1 chunk = plain encoding).

    Args:
        encoder: maps tensors (N, ...) (one per ``xs``) to a tensor (N, ...) or a dict/list of
            such tensors.
        xs: this rank's key inputs, e.g. images (N, 3, H, W) and boxes (N, 4); all permuted
            together.
    Returns:
        the encoder's output for ``xs``, in the original order.
    """
    if comm.get_world_size() > 1:
        xs_shuffled, idx_unshuffle = batch_shuffle(*xs)
        return _map_outputs(encoder(*xs_shuffled), lambda t: batch_unshuffle(t, idx_unshuffle))
    n = xs[0].shape[0]
    splits = min(single_process_splits, n)
    if splits <= 1:
        return encoder(*xs)
    perm = torch.randperm(n, device=xs[0].device)
    chunks = zip(*[x[perm].chunk(splits) for x in xs])
    outputs = [encoder(*chunk) for chunk in chunks]
    if isinstance(outputs[0], dict):
        merged = {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}
    elif isinstance(outputs[0], (list, tuple)):
        merged = [torch.cat(ts) for ts in zip(*outputs)]
    else:
        merged = torch.cat(outputs)
    inverse = torch.argsort(perm)
    return _map_outputs(merged, lambda t: t[inverse])


def _map_outputs(outputs, fn):
    if isinstance(outputs, dict):
        return {k: fn(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return [fn(v) for v in outputs]
    return fn(outputs)
