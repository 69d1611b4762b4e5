import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from insloc_testing import TermSpy

from insloc_detco.data import MoCoV2Mapper, get_pretrain_dataset_dicts
from insloc_detco.modeling.meta_arch.base import ContrastTerm


def _batch(cfg, n):
    mapper = MoCoV2Mapper(cfg)
    dicts = get_pretrain_dataset_dicts(cfg.DATASETS.TRAIN)[:n]
    batch = [mapper(d) for d in dicts]
    for d in batch:
        d.pop("num_skipped")
    return batch


@pytest.mark.slow
def test_moco_v2_step(cfg_loader):
    torch.manual_seed(0)
    cfg = cfg_loader("instant_test/pretrain_moco_v2.yaml", "MODEL.CONTRAST.QUEUE_SIZE", 16)
    model = build_model(cfg).train()
    # detectron2 building blocks, torchvision layout, trainable from res2 on
    assert type(model.encoder_q.backbone).__name__ == "ResNet"
    assert model.encoder_q.backbone.res2[0].conv1.stride == (1, 1)  # STRIDE_IN_1X1: False
    assert model.encoder_q.backbone.res3[0].conv2.stride == (2, 2)
    assert all(p.requires_grad for p in model.encoder_q.parameters())
    assert not any(p.requires_grad for p in model.encoder_k.parameters())
    assert model.encoder_q.head.mlp[0].in_features == 2048
    assert model.encoder_q.head.mlp[2].out_features == 128

    batch = _batch(cfg, 4)
    queue_before = model.queue.keys.clone()
    k_before = [p.clone() for p in model.encoder_k.parameters()]
    spy = TermSpy(model)
    with EventStorage(0) as storage:
        losses = model(batch)
        assert set(losses) == {"loss_contrast"}
        loss = losses["loss_contrast"]
        assert torch.isfinite(loss) and loss.item() > 0
        loss.backward()
        assert "[metric]acc/moco" in storage.histories()
    # gradients reach the query encoder only
    assert model.encoder_q.backbone.stem.conv1.weight.grad is not None
    assert all(p.grad is None for p in model.encoder_k.parameters())
    # the 4 keys were enqueued (unit norm), the rest of the queue untouched
    assert int(model.queue.ptr) == 4
    assert torch.allclose(model.queue.keys[:4].norm(dim=1), torch.ones(4), atol=1e-5)
    assert not torch.equal(model.queue.keys[:4], queue_before[:4])
    assert torch.equal(model.queue.keys[4:], queue_before[4:])
    # the negatives autograd saved are a snapshot: the enqueue after the loss left them alone
    assert torch.equal(spy.calls["moco"]["negatives"], queue_before)
    # the first update is a no-op on equal weights; move the query and check the EMA moves k
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(1.0)
    with EventStorage(0):
        model(batch)
    m = cfg.MODEL.CONTRAST.MOMENTUM
    for p0, p in zip(k_before, model.encoder_k.parameters()):
        assert torch.allclose(p, p0 + (1 - m) * 1.0, atol=1e-5)


def test_moco_v2_eval_returns_embeddings_and_keeps_state(cfg_loader):
    cfg = cfg_loader("instant_test/pretrain_moco_v2.yaml")
    model = build_model(cfg).eval()
    batch = _batch(cfg, 2)
    queue_before = model.queue.keys.clone()
    with torch.no_grad():
        emb = model(batch)
    assert emb.shape == (2, 128)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.equal(model.queue.keys, queue_before) and int(model.queue.ptr) == 0


@pytest.mark.slow
def test_accuracy_is_recorded_every_metrics_period(cfg_loader):
    """Reading an accuracy back from the GPU stalls the step: only on logging iterations."""
    cfg = cfg_loader("instant_test/pretrain_moco_v2.yaml", "SOLVER.LOG_PERIOD", 3)
    model = build_model(cfg).train()
    assert model.metrics_period == 3
    batch = _batch(cfg, 2)
    recorded = []
    for it in range(4):
        with EventStorage(it) as storage:
            model(batch)
            recorded.append("[metric]acc/moco" in storage.histories())
    assert recorded == [True, False, False, True]


def test_a_contrast_term_must_name_a_queue(cfg_loader):
    model = build_model(cfg_loader("instant_test/pretrain_moco_v2.yaml"))
    term = ContrastTerm("moco", "loss_contrast", "moco", "moco", "queues.moco")
    with pytest.raises(AssertionError, match="no queue 'queues.moco'"):
        model.set_contrast_terms([term], [("moco", "queue")])
    with pytest.raises(AssertionError, match="no queue 'encoder_q'"):
        model.set_contrast_terms([], [("moco", "encoder_q")])
