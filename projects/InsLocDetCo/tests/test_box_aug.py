"""InsLoc's box augmentation in the loader: the anchors it picks are distributed as the
reference procedure's (qualifying anchors, greedy NMS on random scores, one survivor uniformly),
also when the device flips the view after the loader drew the box."""

import os

import numpy as np
import pytest
import torch
from conftest import load_config
from detectron2.modeling import build_model
from detectron2.structures import Boxes, pairwise_iou
from PIL import Image
from scipy.stats import chi2_contingency

from insloc_detco.data.box_aug import AnchorBoxAugmentation
from insloc_detco.data.copy_paste import CopyPasteMapper
from insloc_detco.data.photometric import hflip_boxes

INSLOC = "instant_test/pretrain_insloc_fpn.yaml"
# A canvas side that is not a multiple of the stride: the grid (centres 0, 8, ..., 56) is not
# mirror-symmetric (mirrored centres 60, 52, ..., 4), so the anchor picked for a box, mirrored,
# is not an anchor of the grid picked for the mirrored box.
SIZE = (60, 60)
TRUTH = torch.tensor([[9.0, 12.0, 41.0, 38.0]])
DRAWS = 3000
CHUNKS = range(DRAWS // 100)


def small_aug():
    """A dense grid: 28 anchors qualify for TRUTH and the NMS keeps about 9 of them."""
    return AnchorBoxAugmentation(stride=8, sizes=[24, 28, 32], aspect_ratios=[0.8, 1.0, 1.25])


def reference_picks(aug, box, draws, seed=0):
    """The reference's procedure written out plainly, independently of ours: the anchors with
    IoU > 0.5 to ``box`` in a random order (random scores), greedy NMS (drop an anchor whose
    IoU with a kept one exceeds 0.7), one survivor uniformly. Returns anchor indices."""
    rng = np.random.default_rng(seed)
    anchors = aug.anchors(SIZE)
    candidates = np.flatnonzero((pairwise_iou(Boxes(box), anchors)[0] > 0.5).numpy())
    overlap = pairwise_iou(anchors[candidates], anchors[candidates]).numpy()
    picks = []
    for _ in range(draws):
        kept = []
        for i in rng.permutation(len(candidates)):
            if all(overlap[i, j] <= 0.7 for j in kept):
                kept.append(i)
        picks.append(candidates[kept[rng.integers(len(kept))]])
    return np.array(picks)


def anchor_indices(aug, boxes):
    """Index in the grid of each of ``boxes`` (N, 4); -1 where a box is not an anchor (up to
    the rounding of two mirrorings)."""
    anchors = aug.anchors(SIZE).tensor
    same = ((boxes[:, None] - anchors[None]).abs() < 1e-4).all(dim=2)
    return torch.where(same.any(dim=1), same.float().argmax(dim=1), -1).numpy()


def assert_same_distribution(ours, reference):
    values = np.union1d(ours, reference)
    table = np.array([[np.sum(x == v) for v in values] for x in (ours, reference)])
    p = chi2_contingency(table).pvalue
    assert p > 1e-3, f"picked anchors distributed differently (chi-square p = {p:.2g})\n{table}"


@pytest.mark.slow
def test_picks_for_both_flips_follow_the_reference_procedure():
    aug = small_aug()
    torch.manual_seed(0)
    # In chunks of 100 boxes, as small as the loader's one per call (torchvision's batched NMS
    # loops over the images in larger ones).
    pairs = torch.cat([aug.for_both_flips(TRUTH.expand(100, 4), SIZE) for _ in CHUNKS])
    width = SIZE[1]
    # Not flipped later: row 0 is the procedure on the box as it is.
    kept = anchor_indices(aug, pairs[:, 0])
    assert (kept >= 0).all()
    assert_same_distribution(kept, reference_picks(aug, TRUTH, DRAWS))
    # Flipped later with its view: row 1, flipped, is the procedure on the flipped box.
    flipped = anchor_indices(aug, hflip_boxes(pairs[:, 1], width))
    assert (flipped >= 0).all(), "a flipped pick must be an anchor of the grid"
    assert_same_distribution(flipped, reference_picks(aug, hflip_boxes(TRUTH, width), DRAWS, 1))
    # Why two draws: flipping the pick made for the unflipped box would land off the grid.
    assert (anchor_indices(aug, hflip_boxes(pairs[:, 0], width)) < 0).all()


@pytest.mark.slow
def test_distribution_test_detects_a_different_procedure():
    aug = small_aug()
    torch.manual_seed(0)
    ours = anchor_indices(aug, torch.cat([aug(TRUTH.expand(100, 4), SIZE) for _ in CHUNKS]))
    reference = reference_picks(aug, TRUTH, DRAWS)
    # Without the NMS every qualifying anchor would be equally likely: a different law.
    anchors = aug.anchors(SIZE)
    qualifying = np.flatnonzero((pairwise_iou(Boxes(TRUTH), anchors)[0] > 0.5).numpy())
    no_nms = np.random.default_rng(2).choice(qualifying, DRAWS)
    assert_same_distribution(ours, reference)
    with pytest.raises(AssertionError, match="distributed differently"):
        assert_same_distribution(no_nms, reference)


@pytest.fixture(scope="module")
def photos(module_folder):
    root = module_folder("photos")
    rng = np.random.default_rng(0)
    dicts = []
    for i in range(4):
        path = os.path.join(root, f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(path)
        dicts.append({"file_name": path, "image_id": i})
    return dicts


@pytest.mark.parametrize("placement", ["device", "loader"])
def test_mapper_draws_the_query_box_augmentation(photos, placement):
    cfg = load_config(INSLOC, "INPUT.PRETRAIN.AUGMENT_ON", placement)
    mapper = CopyPasteMapper(cfg, photos)
    torch.manual_seed(0)
    out = mapper(photos[0])
    assert out["box_q_aug"].shape == (2, 4)
    truth, width = out["box_q"][None], out["view_q"].shape[-1]
    # Each row qualifies for the view as it will be seen (row 1 once flipped).
    assert pairwise_iou(Boxes(truth), Boxes(out["box_q_aug"][:1])).item() > 0.5
    flipped_row = hflip_boxes(out["box_q_aug"][1:], width)
    assert pairwise_iou(Boxes(hflip_boxes(truth, width)), Boxes(flipped_row)).item() > 0.5
    if placement == "loader":  # flipped in the loader already: one draw
        assert torch.equal(out["box_q_aug"][0], out["box_q_aug"][1])
    off = load_config(INSLOC, "MODEL.INSLOC.BOX_AUG", False, "INPUT.PRETRAIN.AUGMENT_ON", placement)
    assert "box_q_aug" not in CopyPasteMapper(off, photos)(photos[0])


@pytest.mark.slow
@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_step_keeps_the_pick_that_matches_the_flip(flip_prob):
    cfg = load_config(
        INSLOC, "INPUT.PRETRAIN.AUGMENT_ON", "device", "INPUT.PRETRAIN.FLIP_PROB", flip_prob
    )
    torch.manual_seed(0)
    model = build_model(cfg).train()
    side = cfg.INPUT.PRETRAIN.COPY_PASTE.CANVAS_SIZE
    truth = torch.tensor([[10.0, 20.0, 60.0, 70.0], [0.0, 5.0, 50.0, 90.0]])
    pairs = torch.tensor(
        [
            [[8.0, 16.0, 56.0, 64.0], [16.0, 24.0, 64.0, 72.0]],
            [[0.0, 0.0, 48.0, 96.0], [2.0, 4.0, 50.0, 92.0]],
        ]
    )
    batch = [
        {"view_q": torch.zeros(3, side, side, dtype=torch.uint8), "box_q": b, "box_q_aug": p}
        for b, p in zip(truth, pairs)
    ]
    _, boxes = model.views_and_boxes(batch, "q")
    per_level = model.query_boxes(boxes)  # (N, levels, 4)
    p5, p2 = model.in_features.index("p5"), model.in_features.index("p2")
    if flip_prob == 0.0:
        assert torch.equal(per_level[:, p5], pairs[:, 0])
        assert torch.equal(per_level[:, p2], truth)
    else:  # the pick made for the mirrored box, mirrored with the view
        assert torch.equal(per_level[:, p5], hflip_boxes(pairs[:, 1], side))
        assert torch.equal(per_level[:, p2], hflip_boxes(truth, side))
