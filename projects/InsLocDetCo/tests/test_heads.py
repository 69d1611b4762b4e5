"""Projection heads: MoCo v2's MLP, and the optional BN after its first layer
(``MODEL.CONTRAST.MLP_NORM``) in every method."""

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from torch import nn

from insloc_detco.data import build_pretrain_mapper, get_pretrain_dataset_dicts
from insloc_detco.modeling.heads import GlobalEmbeddingHead, ProjectionMLP


def test_projection_mlp_layout_and_norm():
    plain = ProjectionMLP(8, 16, 4)
    # The published head keeps its parameter names (checkpoints stay loadable).
    assert [k for k in plain.state_dict()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    bn = ProjectionMLP(8, 16, 4, "BN")
    assert isinstance(bn[1], nn.BatchNorm1d) and bn[1].num_features == 16
    with pytest.raises(ValueError, match="MLP_NORM"):
        ProjectionMLP(8, 16, 4, "GN")
    # BN centres the hidden units over the batch: embeddings of a batch whose inputs share a
    # large common component no longer all point the same way.
    torch.manual_seed(0)
    x = torch.randn(64, 64, 1, 1) * 0.1 + 5.0
    cos = {}
    for norm in ("", "BN"):
        z = GlobalEmbeddingHead(64, 256, 128, norm).train()(x)
        cos[norm] = (z @ z.T)[~torch.eye(64, dtype=torch.bool)].mean().item()
    assert cos[""] > 0.99 and cos["BN"] < 0.5, cos


@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    [
        "instant_test/pretrain_moco_v2.yaml",
        "instant_test/pretrain_insloc_c4.yaml",
        "instant_test/pretrain_insloc_fpn.yaml",
        "instant_test/pretrain_detco.yaml",
    ],
)
def test_every_method_trains_with_bn_in_its_heads(cfg_loader, config):
    torch.manual_seed(0)
    cfg = cfg_loader(config, "MODEL.CONTRAST.MLP_NORM", "BN", "MODEL.CONTRAST.QUEUE_SIZE", 16)
    model = build_model(cfg).train()
    bns = [m for m in model.encoder_q.modules() if isinstance(m, nn.BatchNorm1d)]
    assert bns, "no BatchNorm1d in the projection heads"
    dicts = get_pretrain_dataset_dicts(cfg.DATASETS.TRAIN)
    mapper = build_pretrain_mapper(cfg, dicts)
    batch = [mapper(d) for d in dicts[:4]]
    if hasattr(mapper, "collate"):
        batch = mapper.collate(batch)
    for d in batch:
        d.pop("num_skipped", None)
    with EventStorage(0):
        losses = model(batch)
        loss = sum(losses.values())
        assert torch.isfinite(loss)
        loss.backward()
    assert all(m.weight.grad is not None for m in bns)
    assert all(m.running_mean.abs().sum() > 0 for m in bns)  # statistics were updated
