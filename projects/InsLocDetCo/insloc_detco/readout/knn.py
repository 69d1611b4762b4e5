"""
Weighted k-nearest-neighbour classification on frozen, L2-normalised features (Wu et al. 2018,
"Unsupervised Feature Learning via Non-Parametric Instance Discrimination", Sec. 3.4): each of
the k training features most cosine-similar to a query votes for its class with weight
exp(s / T); the class with the largest vote wins. k = 20 and 200, T = 0.07 as the SSL
literature reports it.

The memory bank may be split over processes: each process finds the k nearest among its own
shard for every query, the candidates are all-gathered, and the k best overall vote
(:func:`knn_scores`), so the bank of a large training set is never gathered on one process.
"""

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from detectron2.utils import comm

__all__ = ["knn_candidates", "knn_scores", "knn_accuracy", "topk_accuracy"]


@torch.no_grad()
def knn_candidates(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int,
    chunk: int = 1024,
):  # fmt: skip
    """
    Args:
        bank: (N, D) training features (this process's shard); bank_labels: (N,) int64.
        queries: (Q, D) query features (all of them, on every process).
        k: neighbours kept per query (fewer if the shard is smaller).
    Returns:
        (sims (Q, k'), labels (Q, k')) of the k' = min(k, N) most cosine-similar bank rows.
    """
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, bank.shape[0])
    sims, labels = [], []
    for q in queries.split(chunk):
        s, i = (q @ bank.T).topk(k, dim=1)
        sims.append(s)
        labels.append(bank_labels[i])
    return torch.cat(sims), torch.cat(labels)


@torch.no_grad()
def knn_scores(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
    ks: Sequence[int] = (20, 200), temperature: float = 0.07,
) -> Dict[int, torch.Tensor]:  # fmt: skip
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


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Top-k accuracy (%) of (Q, C) scores against (Q,) labels."""
    k = min(k, scores.shape[1])
    hit = (scores.topk(k, dim=1).indices == labels.view(-1, 1)).any(dim=1)
    return 100.0 * hit.float().mean().item()


def knn_accuracy(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor,
    query_labels: torch.Tensor, num_classes: int, ks: Sequence[int] = (20, 200),
    temperature: float = 0.07,
) -> Dict[str, float]:  # fmt: skip
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
