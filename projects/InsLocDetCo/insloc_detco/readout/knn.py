"""
Weighted k-nearest-neighbour classification on frozen, L2-normalised features (Wu et al. 2018,
"Unsupervised Feature Learning via Non-Parametric Instance Discrimination", Sec. 3.4): each of
the k training features most cosine-similar to a query votes for its class with weight
exp(s / T); the class with the largest vote wins. k = 20 and 200, T = 0.07 as the SSL
literature reports it.

The memory bank may be split over processes: each process finds the k nearest among its own
shard for every query, the candidates are all-gathered, and the k best overall vote
(:func:`knn_scores`), so the bank of a large training set is never gathered on one process.
The bank is compared in blocks of rows, so it may be a memory-mapped array on disk
(:mod:`.feature_store`); :func:`sharded_knn_accuracy` also takes the queries in rounds of a
chunk per process, so that no process holds more than a chunk of queries, a block of the bank
and their similarities, whatever the sizes of the two sets.
"""

from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.utils import comm

from .feature_store import global_sum, row_blocks, rows_per_block

__all__ = [
    "knn_candidates",
    "knn_scores",
    "knn_accuracy",
    "sharded_knn_accuracy",
    "topk_hits",
    "topk_accuracy",
]


@torch.no_grad()
def knn_candidates(
    bank,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    chunk: int = 1024,
):
    """
    Args:
        bank: (N, D) training features (this process's shard): a tensor or a memory-mapped
            array, compared block by block.
        bank_labels: (N,) int64.
        queries: (Q, D) query features (the same on every process).
        k: neighbours kept per query (fewer if the shard is smaller).
        chunk: queries compared at a time.
    Returns:
        (sims (Q, k'), labels (Q, k')) of the k' = min(k, N) most cosine-similar bank rows,
        on the queries' device.
    """
    device = queries.device
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, bank.shape[0])
    sims = torch.full((len(queries), k), -float("inf"), device=device)
    labels = torch.zeros((len(queries), k), dtype=torch.long, device=device)
    for start, block in row_blocks(bank):
        block = F.normalize(block.to(device), dim=1)
        block_labels = torch.as_tensor(bank_labels[start : start + len(block)]).to(device)
        for i in range(0, len(queries), chunk):
            s, j = (queries[i : i + chunk] @ block.T).topk(min(k, len(block)), dim=1)
            s = torch.cat([sims[i : i + chunk], s], dim=1)
            lab = torch.cat([labels[i : i + chunk], block_labels[j]], dim=1)
            sims[i : i + chunk], best = s.topk(k, dim=1)
            labels[i : i + chunk] = lab.gather(1, best)
    return sims, labels


@torch.no_grad()
def knn_scores(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = (20, 200),
    temperature: float = 0.07,
) -> Dict[int, torch.Tensor]:
    """
    Weighted kNN class scores, over the bank shards of all processes.

    Returns:
        {k: (Q, num_classes) summed votes exp(s / T) of the k nearest neighbours}.
    """
    kmax = max(ks)
    sims, labels = knn_candidates(bank, bank_labels.long(), queries, kmax)
    if comm.get_world_size() > 1:
        parts = comm.all_gather((sims.cpu(), labels.cpu()))
        sims = torch.cat([p[0] for p in parts], dim=1)
        labels = torch.cat([p[1] for p in parts], dim=1)
        sims, order = sims.topk(min(kmax, sims.shape[1]), dim=1)
        labels = labels.gather(1, order)
    sims, labels = sims.cpu(), labels.cpu()
    out = {}
    for k in ks:
        weights = (sims[:, :k] / temperature).exp()
        votes = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype)
        out[k] = votes.scatter_add_(1, labels[:, :k], weights)
    return out


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> int:
    """How many of (Q, C) ``scores`` have the (Q,) label among their k best classes."""
    k = min(k, scores.shape[1])
    return int((scores.topk(k, dim=1).indices == labels.view(-1, 1)).any(dim=1).sum())


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Top-k accuracy (%) of (Q, C) scores against (Q,) labels."""
    return 100.0 * topk_hits(scores, labels, k) / max(1, len(labels))


def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = (20, 200),
    temperature: float = 0.07,
) -> Dict[str, float]:
    """
    Returns:
        {"top1@k<k>": %, and "top5@k<k>" when there are more than 5 classes}.
    """
    scores = knn_scores(bank, bank_labels, queries, num_classes, ks, temperature)
    out = {}
    for k, s in scores.items():
        out[f"top1@k{k}"] = topk_accuracy(s, query_labels, 1)
        if num_classes > 5:
            out[f"top5@k{k}"] = topk_accuracy(s, query_labels, 5)
    return out


@torch.no_grad()
def sharded_knn_accuracy(
    bank,
    bank_labels,
    queries,
    query_labels,
    num_classes: int,
    ks: Sequence[int] = (20, 200),
    temperature: float = 0.07,
    chunk: Optional[int] = None,
    device="cpu",
) -> Dict[str, float]:
    """
    :func:`knn_accuracy` with the queries sharded too: every process passes its shard of the
    bank and of the queries (tensors or memory-mapped arrays). In each round every process
    contributes ``chunk`` of its queries, the round's queries are all-gathered, scored against
    every bank shard (:func:`knn_scores`) and counted once.

    Args:
        chunk: queries per process and round (None: what keeps a round's gathered queries and
            candidates within a block of :data:`.feature_store.READ_BLOCK_BYTES`).
    Returns:
        {"top1@k<k>": %, and "top5@k<k>" with more than 5 classes}, the same in every process.
    """
    world, rank = comm.get_world_size(), comm.get_rank()
    if chunk is None:  # bytes per query of a round: its features and its candidates, gathered
        chunk = rows_per_block(world * max(4 * queries.shape[1], 12 * max(ks) * world))
    rounds = max(comm.all_gather(-(-len(queries) // chunk)))
    bank_labels = torch.as_tensor(np.asarray(bank_labels), dtype=torch.long)
    hits = {f"top{t}@k{k}": 0 for k in ks for t in (1, 5)}
    for r in range(rounds):
        part = torch.from_numpy(np.array(queries[r * chunk : (r + 1) * chunk])).float()
        mine = torch.as_tensor(np.asarray(query_labels[r * chunk : (r + 1) * chunk]))
        parts = comm.all_gather(part) if world > 1 else [part]
        scores = knn_scores(
            bank, bank_labels, torch.cat(parts).to(device), num_classes, ks, temperature
        )
        first = sum(len(p) for p in parts[:rank])  # this process's rows of the round
        for k, s in scores.items():
            for t in (1, 5):
                hits[f"top{t}@k{k}"] += topk_hits(s[first : first + len(part)], mine, t)
    total = global_sum({"n": np.array(len(queries)), **{h: np.array(v) for h, v in hits.items()}})
    n = max(1, int(total["n"]))
    return {h: 100.0 * int(total[h]) / n for h in hits if num_classes > 5 or h.startswith("top1")}
