"""InsLoc meta-architectures (R50-FPN, R50-C4) and the bounding-box augmentation."""

import pytest
import torch
from conftest import load_config
from detectron2 import model_zoo
from detectron2.modeling import build_model
from detectron2.structures import Boxes, pairwise_iou
from detectron2.utils.events import EventStorage
from insloc_testing import TermSpy

from insloc_detco.data.box_aug import AnchorBoxAugmentation

S, N = 64, 4  # tiny canvases and batch
BOX_HEAD_TRANSFERRED = ("conv1", "conv2", "conv3", "conv4", "fc1")
CONFIGS = {"fpn": "pretrain_insloc_fpn.yaml", "c4": "pretrain_insloc_c4.yaml"}
TINY = (
    "MODEL.DEVICE",
    "cpu",
    "MODEL.CONTRAST.QUEUE_SIZE",
    "16",
    "MODEL.CONTRAST.MLP_HIDDEN_DIM",
    "64",
    "MODEL.INSLOC.FC_DIM",
    "64",
    "MODEL.INSLOC.BOX_AUG_ANCHOR_SIZES",
    "[8, 16, 32, 64]",
    "INPUT.PRETRAIN.COPY_PASTE.CANVAS_SIZE",
    str(S),
    "INPUT.PRETRAIN.COPY_PASTE.PASTE_SIZE",
    "(32, 63)",
)


def tiny_model(kind, *opts):
    torch.manual_seed(0)
    return build_model(load_config(CONFIGS[kind], *TINY, *opts))


def random_boxes(n, size=S, generator=None):
    """(n, 4) XYXY boxes inside a size x size canvas, sides in [size/2, size)."""
    wh = torch.randint(size // 2, size, (n, 2), generator=generator).float()
    xy = (torch.rand(n, 2, generator=generator) * (size - wh)).floor()
    return torch.cat([xy, xy + wh], dim=1)


# The tiny configs' box augmentation, as the loader (CopyPasteMapper) applies it.
TINY_BOX_AUG = AnchorBoxAugmentation(
    stride=16, sizes=[8, 16, 32, 64], aspect_ratios=[0.5, 0.75, 1.0, 1.5, 2.0]
)


def random_batch(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    boxes_q, boxes_k = random_boxes(n, generator=g), random_boxes(n, generator=g)
    torch.manual_seed(seed)
    box_q_aug = TINY_BOX_AUG.for_both_flips(boxes_q, (S, S))
    return [
        {
            "view_q": torch.randint(0, 256, (3, S, S), dtype=torch.uint8, generator=g),
            "view_k": torch.randint(0, 256, (3, S, S), dtype=torch.uint8, generator=g),
            "box_q": boxes_q[i],
            "box_k": boxes_k[i],
            "box_q_aug": box_q_aug[i],
        }
        for i in range(n)
    ]


def query_state(model, prefix):
    sd = model.state_dict()
    return {k[len(prefix) :]: v.shape for k, v in sd.items() if k.startswith(prefix)}


def detector_state(zoo_config):
    """Tensor shapes of a stock detectron2 detector with SyncBN norms (as fine-tuned)."""
    cfg = model_zoo.get_config(zoo_config)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.NORM = "SyncBN"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False  # torchvision layout, as in the transfer recipes
    if "FPN" in zoo_config:
        cfg.MODEL.FPN.NORM = "SyncBN"
        cfg.MODEL.ROI_BOX_HEAD.NORM = "SyncBN"
    torch.manual_seed(0)
    return {k: v.shape for k, v in build_model(cfg).state_dict().items()}


def test_fpn_tensors_land_in_mask_rcnn_fpn():
    ours = query_state(tiny_model("fpn"), "encoder_q.")
    theirs = detector_state("Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml")  # 4conv1fc box head
    wanted = {
        k: s
        for k, s in theirs.items()
        if k.startswith(("backbone.bottom_up.", "backbone.fpn_"))
        or k.startswith(tuple(f"roi_heads.box_head.{n}." for n in BOX_HEAD_TRANSFERRED))
    }
    renamed = {
        ("roi_heads." + k if k.startswith("box_head.") else k): s
        for k, s in ours.items()
        if k.startswith(("backbone.", "box_head."))
    }
    assert renamed == wanted  # same names, same shapes, nothing missing, nothing extra
    assert any(k.startswith("backbone.fpn_lateral2.norm.") for k in renamed)  # BN in the FPN


def test_c4_tensors_land_in_faster_rcnn_c4():
    ours = query_state(tiny_model("c4"), "encoder_q.")
    theirs = detector_state("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml")
    wanted = {k: s for k, s in theirs.items() if k.startswith(("backbone.", "roi_heads.res5."))}
    renamed = {
        ("roi_heads." + k if k.startswith("res5.") else k): s
        for k, s in ours.items()
        if k.startswith(("backbone.", "res5."))
    }
    assert renamed == wanted
    assert not any(k.startswith("backbone.res5") for k in renamed)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fpn", "c4"])
def test_training_step(kind):
    model = tiny_model(kind).train()
    levels = model.in_features
    with EventStorage(0) as storage:
        losses = model(random_batch())
        assert set(losses) == {f"loss_insloc_{f}" for f in levels}
        assert all(torch.isfinite(v) and v > 0 for v in losses.values())
        sum(losses.values()).backward()
        logged = storage.latest()
    for f in levels:
        assert f"[metric]acc/insloc_{f}" in logged  # per-level contrastive accuracy
    first = "box_head.conv1.weight" if kind == "fpn" else "res5.0.conv1.weight"
    q_params = dict(model.encoder_q.named_parameters())
    stem = "backbone.bottom_up.stem" if kind == "fpn" else "backbone.stem"
    for name in (first, stem + ".conv1.weight"):
        assert q_params[name].grad is not None and q_params[name].grad.abs().sum() > 0
    assert all(p.grad is None for p in model.encoder_k.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fpn", "c4"])
def test_roi_features_follow_the_box(kind):
    model = tiny_model(kind).eval()
    x = model.preprocess([torch.randint(0, 256, (3, S, S), dtype=torch.uint8)])
    box = torch.tensor([[4.0, 8.0, 36.0, 48.0]])
    moved = box + torch.tensor([20.0, 12.0, 20.0, 12.0])
    with torch.no_grad():
        a, again, b = (model.encoder_q(x, bx) for bx in (box, box.clone(), moved))
    for f in model.in_features:
        assert torch.allclose(a[f], again[f])
        assert (a[f] - b[f]).abs().max() > 1e-3, f"{f}: the RoI feature ignores the box"
    # Without RoIAlign (Table 3b baseline) the whole map is pooled: the box plays no role.
    model.encoder_q.roi_align = False
    with torch.no_grad():
        a, b = model.encoder_q(x, box), model.encoder_q(x, moved)
    for f in model.in_features:
        assert torch.allclose(a[f], b[f])


def test_box_aug_overlaps_the_truth_and_is_random():
    aug = AnchorBoxAugmentation(stride=16, sizes=[32, 64, 128, 256], aspect_ratios=[0.5, 1, 2])
    anchors = aug.anchors((256, 256)).tensor
    assert len(anchors) == 16 * 16 * 12
    torch.manual_seed(0)
    truth = random_boxes(64, size=256)
    has_anchor = pairwise_iou(Boxes(truth), Boxes(anchors)).max(dim=1).values > 0.5
    assert has_anchor.float().mean() > 0.8
    draws = [aug(truth, (256, 256)) for _ in range(5)]
    for out in draws:
        iou = pairwise_iou(Boxes(truth), Boxes(out)).diag()
        assert (iou > 0.5).all(), iou.min()
        is_anchor = (out[:, None] == anchors[None]).all(dim=2).any(dim=1)
        assert torch.equal(is_anchor, has_anchor)  # an anchor if one qualifies ...
        assert torch.equal(out[~has_anchor], truth[~has_anchor])  # ... else the true box
    assert not torch.equal(draws[0], draws[1]), "the augmentation is not random"


def test_box_aug_keeps_the_box_without_a_qualifying_anchor():
    aug = AnchorBoxAugmentation(stride=16, sizes=[64, 128], aspect_ratios=[1.0])
    truth = torch.tensor([[100.0, 100.0, 104.0, 200.0], [0.0, 0.0, 128.0, 128.0]])
    out = aug(truth, (256, 256))
    assert torch.equal(out[0], truth[0])  # a 4x100 box: no square anchor overlaps it enough
    assert pairwise_iou(Boxes(truth[1:]), Boxes(out[1:])).item() > 0.5


def spy_boxes(module):
    """Record the boxes argument of every call of an encoder."""
    seen = []
    module.register_forward_pre_hook(lambda m, args: seen.append(args[1].detach().clone()))
    return seen


def sort_rows(x):
    return x[torch.argsort(x @ torch.tensor([1e9, 1e6, 1e3, 1.0]))]


@pytest.mark.slow
@pytest.mark.parametrize("kind,box_aug", [("fpn", True), ("c4", True), ("fpn", False)])
def test_query_and_key_boxes(kind, box_aug):
    model = tiny_model(kind, "MODEL.INSLOC.BOX_AUG", str(box_aug)).train()
    seen_q, seen_k = spy_boxes(model.encoder_q), spy_boxes(model.encoder_k)
    batch = random_batch()
    box_q = torch.stack([d["box_q"] for d in batch])
    box_k = torch.stack([d["box_k"] for d in batch])
    with EventStorage(0):
        model(batch)
    # Keys: the true key boxes (shuffle-BN permutes them with their images, so compare sets).
    assert torch.equal(sort_rows(torch.cat(seen_k)), sort_rows(box_k))
    (q,) = seen_q
    assert q.shape == (N, len(model.in_features), 4)
    augmented = {"fpn": ["p5"], "c4": ["res4"]}[kind] if box_aug else []
    for i, f in enumerate(model.in_features):
        if f in augmented:
            assert (pairwise_iou(Boxes(box_q), Boxes(q[:, i])).diag() > 0.5).all()
            assert not torch.equal(q[:, i], box_q), f"{f}: the query box was not augmented"
        else:
            assert torch.equal(q[:, i], box_q), f"{f}: the query box is not the true box"


@pytest.mark.slow
def test_per_level_queues_are_independent():
    model = tiny_model("fpn").train()
    before = {f: q.keys.clone() for f, q in model.queues.items()}
    spy = TermSpy(model)
    with EventStorage(0):
        model(random_batch())
    levels = model.in_features
    assert len({model.queues[f].keys.data_ptr() for f in levels}) == len(levels)
    for f in levels:
        negatives = spy.calls[f"insloc_{f}"]["negatives"]
        assert torch.equal(negatives, before[f]), f"{f} was contrasted with another queue"
        assert torch.equal(model.queues[f].keys[:N], spy.keys[f]), f"{f} queue got other keys"
        assert torch.equal(model.queues[f].keys[N:], before[f][N:])
        assert int(model.queues[f].ptr) == N
    assert not torch.allclose(spy.keys["p2"], spy.keys["p5"])  # levels really differ


@pytest.mark.slow
def test_level_loss_weights():
    model = tiny_model("fpn", "MODEL.INSLOC.LEVEL_LOSS_WEIGHTS", "[1.0, 0.0, 2.0, 1.0]").train()
    reference = tiny_model("fpn").train()  # same seed: same weights
    losses = []
    for m in (model, reference):
        torch.manual_seed(1)  # same shuffle-BN permutation and box augmentation
        with EventStorage(0):
            losses.append(m(random_batch()))
    weighted, plain = losses
    assert weighted["loss_insloc_p3"] == 0
    assert torch.allclose(weighted["loss_insloc_p2"], plain["loss_insloc_p2"])
    assert torch.allclose(weighted["loss_insloc_p4"], 2 * plain["loss_insloc_p4"])


@pytest.mark.parametrize(
    "name,switches",
    [
        ("pretrain_insloc_fpn.yaml", (True, True, True)),
        ("pretrain_insloc_c4.yaml", (True, True, True)),
        ("instant_test/pretrain_insloc_fpn.yaml", (True, True, True)),
        ("instant_test/pretrain_insloc_c4.yaml", (True, True, True)),
        ("ablation/insloc_fpn_roialign.yaml", (True, False, False)),
        ("ablation/insloc_fpn_copypaste.yaml", (True, True, False)),
    ],
)
def test_configs_load(name, switches):
    cfg = load_config(name)
    i = cfg.MODEL.INSLOC
    assert (i.ROI_ALIGN, i.COPY_PASTE, i.BOX_AUG) == switches  # InsLoc Table 3b rows
    assert cfg.INPUT.PRETRAIN.MAPPER == "CopyPasteMapper"
    assert len(i.LEVEL_LOSS_WEIGHTS) == len(i.IN_FEATURES)
    assert set(i.BOX_AUG_FEATURES) <= set(i.IN_FEATURES)
