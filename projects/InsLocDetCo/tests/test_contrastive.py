import math

import pytest
import torch
import torch.nn.functional as F
from insloc_testing import run_distributed
from torch import nn

from insloc_detco.modeling.contrastive import (
    ContrastiveQueue,
    batch_shuffle,
    batch_unshuffle,
    broadcast_queues,
    concat_all_gather,
    contrastive_accuracy,
    encode_with_shuffle_bn,
    info_nce,
    momentum_update,
)


def test_queue_fifo_contents_and_wrap():
    torch.manual_seed(0)
    q = ContrastiveQueue(dim=4, size=10)
    assert torch.allclose(q.keys.norm(dim=1), torch.ones(10))  # starts with unit-norm noise
    first = F.normalize(torch.randn(6, 4), dim=1)
    q.write(first)
    assert int(q.ptr) == 6
    assert torch.equal(q.keys[:6], first)
    second = F.normalize(torch.randn(6, 4), dim=1)
    initial_tail = q.keys[6:].clone()
    q.write(second)
    # 4 keys fill slots 6..9, the other 2 wrap to the front.
    assert int(q.ptr) == 2
    assert torch.equal(q.keys[6:10], second[:4])
    assert torch.equal(q.keys[:2], second[4:])
    assert torch.equal(q.keys[2:6], first[2:6])  # still there: FIFO, oldest overwritten first
    assert not torch.equal(q.keys[6:], initial_tail)


def test_queue_larger_batch_than_queue_keeps_newest():
    q = ContrastiveQueue(dim=2, size=3)
    keys = F.normalize(torch.randn(5, 2), dim=1)
    q.write(keys)
    assert sorted(q.keys.tolist()) == sorted(keys[-3:].tolist())


def test_queue_is_a_buffer_not_a_parameter():
    q = ContrastiveQueue(dim=4, size=8)
    assert list(q.parameters()) == []
    assert set(q.state_dict()) == {"keys", "ptr"}


def test_info_nce_matches_hand_computation():
    q = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=1)
    k = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0]]), dim=1)
    neg = F.normalize(torch.tensor([[-1.0, 0.0], [0.0, -1.0], [1.0, 1.0]]), dim=1)
    T = 0.2
    loss, logits = info_nce(q, k, neg, T)
    expected = 0.0
    for i in range(2):
        pos = math.exp(float(q[i] @ k[i]) / T)
        negs = sum(math.exp(float(q[i] @ n) / T) for n in neg)
        expected += -math.log(pos / (pos + negs))
    assert loss.item() == pytest.approx(expected / 2, rel=1e-5)
    assert logits.shape == (2, 4)
    assert logits[0, 0].item() == pytest.approx(0.8 / T, rel=1e-5)
    # query 0: positive 0.8 beats the best negative [1,1]/sqrt2 (0.707); query 1: the
    # negative (0.99) beats its positive (0.8).
    assert contrastive_accuracy(logits).item() == pytest.approx(50.0)
    hard_neg = torch.cat([neg, F.normalize(torch.tensor([[1.0, 0.01]]), dim=1)])
    _, logits = info_nce(q, k, hard_neg, T)
    assert contrastive_accuracy(logits).item() == pytest.approx(0.0)


def test_momentum_update_amount_and_no_grad():
    torch.manual_seed(0)
    query = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    key = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    for p in key.parameters():
        p.requires_grad_(False)
    q_before = [p.detach().clone() for p in query.parameters()]
    k_before = [p.detach().clone() for p in key.parameters()]
    key[1].running_mean.fill_(7.0)
    momentum_update(query, key, 0.9)
    for pq, pk0, pk in zip(q_before, k_before, key.parameters()):
        assert torch.allclose(pk, 0.9 * pk0 + 0.1 * pq, atol=1e-6)
        assert pk.grad is None and not pk.requires_grad
    assert torch.all(key[1].running_mean == 7.0)  # buffers are the key encoder's own
    for p0, p in zip(q_before, query.parameters()):  # the query is not touched
        assert torch.equal(p0, p)


def test_single_process_split_bn_restores_order_and_splits_statistics():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(2).train()
    x = torch.randn(8, 2) * 3 + 1
    plain = encode_with_shuffle_bn(bn, x, single_process_splits=1)
    assert torch.allclose(plain, F.batch_norm(x, None, None, training=True), atol=1e-5)
    split = encode_with_shuffle_bn(bn, x, single_process_splits=2)
    # Each half is normalised with its own statistics: mean 0 per chunk, not the global one,
    # so the result differs from plain BN, but the order is restored: an elementwise-monotone
    # map per chunk keeps the ranks of x within each feature.
    assert not torch.allclose(split, plain, atol=1e-3)
    identity = encode_with_shuffle_bn(lambda t: t * 2, x, single_process_splits=2)
    assert torch.equal(identity, x * 2)
    pair = encode_with_shuffle_bn(lambda a, b: a + b, x, x * 10, single_process_splits=4)
    assert torch.allclose(pair, x * 11)  # both inputs get the same permutation


def _shuffle_bn_worker(per_rank):
    import torch.distributed as dist
    from detectron2.utils import comm

    rank = comm.get_rank()
    torch.manual_seed(100 + rank)  # different local RNG: the permutation must come from rank 0
    x = torch.arange(per_rank * 2 * 3, dtype=torch.float32).view(2 * per_rank, 3)
    mine = x[rank * per_rank : (rank + 1) * per_rank]

    gathered = concat_all_gather(mine)
    assert torch.equal(gathered, x)

    (shuffled,), idx_unshuffle = batch_shuffle(mine)
    # every rank received a distinct slice of one global permutation
    slices = [torch.empty_like(shuffled) for _ in range(2)]
    dist.all_gather(slices, shuffled)
    assert sorted(torch.cat(slices)[:, 0].tolist()) == sorted(x[:, 0].tolist())
    assert torch.equal(batch_unshuffle(shuffled, idx_unshuffle), mine)

    # An encoder with per-sample output: shuffle-BN must equal the direct computation.
    lin = torch.nn.Linear(3, 5)
    torch.manual_seed(0)
    lin.reset_parameters()
    out = encode_with_shuffle_bn(lin, mine)
    assert torch.allclose(out, lin(mine), atol=1e-6)

    # With BatchNorm in training mode, sample i must be normalised with the statistics of the
    # slice it was shuffled into, not of its own rank's batch: compute that slice directly.
    bn = torch.nn.BatchNorm1d(3).train()
    torch.manual_seed(5)
    out_bn = encode_with_shuffle_bn(bn, mine)
    torch.manual_seed(5)
    (slice_,), idx = batch_shuffle(mine)
    slice_bn = torch.nn.functional.batch_norm(slice_, None, None, training=True)
    expected = batch_unshuffle(slice_bn, idx)
    assert torch.allclose(out_bn, expected, atol=1e-5)
    # ... and this differs from normalising the local batch, i.e. the shuffle had an effect
    local = torch.nn.functional.batch_norm(mine, None, None, training=True)
    differs = torch.tensor([float(not torch.allclose(out_bn, local, atol=1e-4))])
    dist.all_reduce(differs)
    assert differs.item() >= 1

    q = ContrastiveQueue(dim=3, size=8)
    q.write(concat_all_gather(mine))
    assert torch.equal(q.keys[: 2 * per_rank], x)  # keys of all ranks, in rank order


@pytest.mark.slow
def test_shuffle_bn_two_processes():
    run_distributed(_shuffle_bn_worker, 2, args=(3,))


def test_broadcast_queues_single_process_is_a_no_op():
    q = ContrastiveQueue(dim=4, size=6)
    keys = q.keys.clone()
    assert broadcast_queues(nn.Sequential(q)) == 1 and torch.equal(q.keys, keys)
