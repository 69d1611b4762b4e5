"""DetCo meta-architecture: its 12 terms, their queues and weights, ablations, shuffle-BN."""

import json
import os

import pytest
import torch
from conftest import load_config
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone
from detectron2.utils.events import EventStorage
from insloc_testing import TermSpy, run_train_net

STAGES = ("res2", "res3", "res4", "res5")
TERMS = ("gg", "ll", "lg")
N = 4  # images per batch


def tiny_model(*opts):
    """DetCo from the instant config at a still smaller scale: 32 px views, 16 px patches."""
    cfg = load_config(
        "instant_test/pretrain_detco.yaml",
        "INPUT.PRETRAIN.CROP_SIZE",
        32,
        "INPUT.PRETRAIN.JIGSAW.CELL_SIZE",
        20,
        "INPUT.PRETRAIN.JIGSAW.PATCH_SIZE",
        16,
        "MODEL.CONTRAST.QUEUE_SIZE",
        16,
        *opts,
    )
    torch.manual_seed(0)
    return build_model(cfg).train()


def tiny_batch(with_patches=True, seed=1):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)

    batch = [{"view_q": rand(3, 32, 32), "view_k": rand(3, 32, 32)} for _ in range(N)]
    if with_patches:
        for x in batch:
            x["patches_q"], x["patches_k"] = rand(9, 3, 16, 16), rand(9, 3, 16, 16)
    return batch


def queue_snapshot(model):
    return {(kind, f): q.keys.clone() for kind, qs in model.queues.items() for f, q in qs.items()}


TERM_WEIGHTS = [1.0, 0.5, 0.25]  # distinct, so that a mix-up of terms shows


@pytest.fixture(scope="module")
def step():
    """One training step of a full DetCo, with what its InfoNCE terms and queues saw."""
    model = tiny_model("MODEL.DETCO.TERM_WEIGHTS", TERM_WEIGHTS)
    spy = TermSpy(model)
    before = queue_snapshot(model)
    with EventStorage(0) as storage:
        losses = model(tiny_batch())
        sum(losses.values()).backward()
    return {
        "model": model,
        "spy": spy,
        "before": before,
        "losses": losses,
        "logged": {k for k in storage.latest() if k.startswith("[metric]acc/")},
    }


def test_twelve_finite_terms_backward_and_accuracies(step):
    model, losses = step["model"], step["losses"]
    assert set(losses) == {f"loss_{s}_{t}" for s in STAGES for t in TERMS}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    assert step["logged"] == {f"[metric]acc/{s}_{t}" for s in STAGES for t in TERMS}
    # Every query parameter takes part (DDP without find_unused_parameters needs it) ...
    no_grad = [n for n, p in model.encoder_q.named_parameters() if p.grad is None]
    assert not no_grad, no_grad
    # ... and the key encoder, a momentum copy, gets none.
    assert all(p.grad is None and not p.requires_grad for p in model.encoder_k.parameters())
    # The backbone is where the converter expects it, as in MoCo v2.
    names = set(model.state_dict())
    assert "encoder_q.backbone.stem.conv1.weight" in names
    assert "encoder_q.backbone.res5.2.conv3.norm.running_var" in names


def test_each_stage_and_kind_has_its_own_queue_filled_with_its_own_keys(step):
    model, spy, before = step["model"], step["spy"], step["before"]
    assert len(before) == 8
    new_rows = {}
    for (kind, f), old in before.items():
        queue = model.queues[kind][f]
        assert int(queue.ptr) == N
        assert torch.equal(queue.keys[N:], old[N:])  # nothing else was overwritten
        assert torch.allclose(queue.keys[:N], spy.keys[f"{f}/{kind}"])
        new_rows[(kind, f)] = queue.keys[:N]
    # 8 distinct sets of keys: no two queues received the same embeddings.
    rows = list(new_rows.values())
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            assert not torch.allclose(rows[i], rows[j], atol=1e-3)


def test_each_term_uses_the_queue_and_positive_of_its_key_kind(step):
    spy, before = step["spy"], step["before"]
    for f in STAGES:
        for term, kind in (("gg", "g"), ("ll", "l"), ("lg", "g")):  # l -> g: the global queue
            call = spy.calls[f"{f}_{term}"]
            assert torch.equal(call["negatives"], before[(kind, f)]), (f, term)
            assert torch.allclose(call["k"], spy.keys[f"{f}/{kind}"]), (f, term)
        assert not torch.equal(spy.calls[f"{f}_lg"]["negatives"], before[("l", f)])


def test_stage_and_term_weights_are_applied_as_configured(step):
    stage_w = [0.1, 0.4, 0.7, 1.0]  # the default, DetCo Eq. 3
    for s, ws in zip(STAGES, stage_w):
        for t, wt in zip(TERMS, TERM_WEIGHTS):
            raw = step["spy"].calls[f"{s}_{t}"]["loss"]
            assert raw.item() > 0.1  # a real InfoNCE, so the product below is informative
            weighted = step["losses"][f"loss_{s}_{t}"].item()
            assert weighted == pytest.approx(ws * wt * raw.item(), rel=1e-6)


def test_query_backbone_matches_detectron2_c4_and_fpn_detectors(step):
    pretrained = {k: v.shape for k, v in step["model"].encoder_q.backbone.state_dict().items()}
    cfg = get_cfg()  # detectron2's defaults: Faster R-CNN R50-C4
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.NORM = "BN"  # the fine-tunes use SyncBN: same tensor names as BN
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    c4 = build_model(cfg)
    c4_shapes = {k: v.shape for k, v in c4.backbone.state_dict().items()}
    c4_shapes.update({f"res5.{k}": v.shape for k, v in c4.roi_heads.res5.state_dict().items()})
    assert c4_shapes == pretrained  # stem/res2..res4 -> backbone.*, res5 -> roi_heads.res5.*
    cfg.MODEL.RESNETS.OUT_FEATURES = list(STAGES)
    cfg.MODEL.FPN.IN_FEATURES = list(STAGES)
    fpn = build_resnet_fpn_backbone(cfg, ShapeSpec(channels=3))
    assert {k: v.shape for k, v in fpn.bottom_up.state_dict().items()} == pretrained


def test_ablation_mls_only_has_four_global_terms_and_needs_no_patches():
    model = tiny_model("MODEL.DETCO.GLOBAL_LOCAL", False)
    with EventStorage(0):
        losses = model(tiny_batch(with_patches=False))
    assert set(losses) == {f"loss_{s}_gg" for s in STAGES}
    assert model.encoder_q.local_heads is None and set(model.queues) == {"g"}
    assert losses["loss_res2_gg"].item() < losses["loss_res5_gg"].item()  # w = 0.1 vs 1.0


def test_ablation_glc_only_has_three_terms_on_res5_only():
    model = tiny_model("MODEL.DETCO.MULTI_LEVEL", False)
    with EventStorage(0):
        losses = model(tiny_batch())
        sum(losses.values()).backward()
    assert set(losses) == {f"loss_res5_{t}" for t in TERMS}
    assert set(model.encoder_q.global_heads) == set(model.encoder_q.local_heads) == {"res5"}
    assert all(p.grad is not None for p in model.encoder_q.parameters())


def test_shuffle_bn_keeps_each_patch_set_with_its_image():
    # With BN in eval mode the encoder is batch-independent, so the shuffled, chunked key pass
    # must reproduce a plain pass exactly, provided the 9 patches of an image stay together.
    model = tiny_model("MODEL.CONTRAST.SINGLE_PROCESS_BN_SPLITS", N)
    model.encoder_k.eval()
    _, k_inputs = model.prepare_inputs(tiny_batch())
    assert k_inputs[1].shape == (N, 9, 3, 16, 16)
    torch.manual_seed(3)
    shuffled = model.encode_keys(*k_inputs)
    with torch.no_grad():
        plain = model.encoder_k(*k_inputs)
    assert set(shuffled) == set(plain)
    for name in plain:
        assert torch.allclose(shuffled[name], plain[name], atol=1e-5), name


@pytest.mark.slow
def test_instant_config_trains_in_two_processes(tmp_path):
    out = str(tmp_path)
    proc = run_train_net(
        "--config-file",
        "instant_test/pretrain_detco.yaml",
        "--num-gpus",
        2,
        "SOLVER.MAX_ITER",
        2,
        "SOLVER.LOG_PERIOD",
        1,
        "OUTPUT_DIR",
        out,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(os.path.join(out, "metrics.json")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    last = [r for r in records if "total_loss" in r][-1]
    for s in STAGES:
        for t in TERMS:
            assert last[f"loss_{s}_{t}"] == pytest.approx(last[f"loss_{s}_{t}"])  # not NaN
            assert f"[metric]acc/{s}_{t}" in last
    ckpt = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)
    # Both ranks' keys (4 each) reached all 8 queues on both steps.
    ptrs = {k: int(v) for k, v in ckpt["model"].items() if k.endswith(".ptr")}
    assert len(ptrs) == 8 and set(ptrs.values()) == {2 * 8}
    os.remove(os.path.join(out, "model_final.pth"))  # ~1 GB
