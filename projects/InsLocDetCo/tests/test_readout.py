"""The readout protocols on injected feature tensors (CPU, seconds): a known-good feature scores
near 100 %, a random one near chance; multi-process pieces agree with one process."""

import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from insloc_testing import run_distributed

from insloc_detco.readout.datasets import image_level_targets
from insloc_detco.readout.features import gather_shards
from insloc_detco.readout.knn import knn_accuracy, knn_scores
from insloc_detco.readout.linear import LinearRecipe, linear_probe
from insloc_detco.readout.localization import (
    cell_labels,
    grid_boxes,
    localization_probe,
    object_cell_probe,
    object_cells,
)
from insloc_detco.readout.svm import average_precision, svm_readout

# A short recipe for cached features: seconds, same optimiser as the protocol.
FAST = LinearRecipe(epochs=30, lr=1.0, batch_size=64, milestones=(20, 25), normalize="standardize")


def _good(labels: torch.Tensor, num_classes: int, dim: int = 64, noise: float = 0.1, seed=0):
    """A fixed random projection of the one-hot labels, plus noise: linearly separable."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(num_classes, dim, generator=g)
    onehot = torch.nn.functional.one_hot(labels, num_classes).float()
    return onehot @ proj + noise * torch.randn(len(labels), dim, generator=g)


def _labels(n: int, num_classes: int, seed: int) -> torch.Tensor:
    return torch.randint(num_classes, (n,), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------
# kNN
# ------------------------------------------------------------------------------------------
def test_knn_good_features_near_100_random_near_chance():
    c = 8
    ytr, yva = _labels(400, c, 1), _labels(200, c, 2)
    good = knn_accuracy(_good(ytr, c), ytr, _good(yva, c, seed=0), yva, c, ks=(20, 200))
    assert good["top1@k20"] > 98 and good["top1@k200"] > 98
    g = torch.Generator().manual_seed(3)
    rand = knn_accuracy(
        torch.randn(400, 64, generator=g), ytr, torch.randn(200, 64, generator=g), yva, c, ks=(20,)
    )
    assert abs(rand["top1@k20"] - 100 / c) < 10
    assert set(good) == {"top1@k20", "top5@k20", "top1@k200", "top5@k200"}


def test_knn_weights_votes_by_similarity():
    # One very close neighbour of class 1 outweighs two distant ones of class 0 at T = 0.07.
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.05]])
    scores = knn_scores(bank, labels, query, 2, ks=(3,), temperature=0.07)[3]
    assert scores.argmax(1).item() == 1
    # Unweighted (very high T) majority voting picks class 0.
    scores = knn_scores(bank, labels, query, 2, ks=(3,), temperature=1e6)[3]
    assert scores.argmax(1).item() == 0


def _two_processes(bank, labels, queries, expected_scores, expected_gathered):
    from detectron2.utils import comm

    rank, world = comm.get_rank(), comm.get_world_size()
    # kNN with the memory bank split over the processes.
    got = knn_scores(bank[rank::world], labels[rank::world], queries, 5, ks=(3, 7))
    for k in (3, 7):
        torch.testing.assert_close(got[k], expected_scores[k])
    # Gathered features come back in record order, several rows per record kept together.
    index = torch.arange(rank, 7, world)
    local = {
        "index": index,
        "res5": index[:, None].float() * torch.ones(1, 3),
        "boxes": index.repeat_interleave(4)[:, None].float(),
    }
    out = gather_shards(local)
    for k, v in expected_gathered.items():
        torch.testing.assert_close(out[k], v)


@pytest.mark.slow
def test_sharded_knn_and_gathered_features_match_one_process():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(50, 16, generator=g), torch.randn(9, 16, generator=g)
    labels = torch.randint(5, (50,), generator=g)
    expected = knn_scores(bank, labels, queries, 5, ks=(3, 7))
    index = torch.arange(7)
    gathered = {
        "index": index,
        "res5": index[:, None].float() * torch.ones(1, 3),
        "boxes": index.repeat_interleave(4)[:, None].float(),
    }
    run_distributed(_two_processes, 2, args=(bank, labels, queries, expected, gathered))


# ------------------------------------------------------------------------------------------
# Linear classification
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("normalize", ["none", "standardize"])
def test_linear_probe_good_near_100_random_near_chance(normalize):
    c = 5
    recipe = LinearRecipe(epochs=30, lr=1.0, batch_size=64, milestones=(20,), normalize=normalize)
    ytr, yva = _labels(300, c, 1), _labels(200, c, 2)
    good = linear_probe(_good(ytr, c), ytr, _good(yva, c), yva, c, recipe)
    assert good["top1"] > 98
    g = torch.Generator().manual_seed(4)
    rand = linear_probe(
        torch.randn(300, 64, generator=g), ytr, torch.randn(200, 64, generator=g), yva, c, recipe
    )
    assert abs(rand["top1"] - 100 / c) < 12


def test_linear_probe_is_seeded_and_reports_divergence():
    c = 4
    ytr, yva = _labels(128, c, 1), _labels(64, c, 2)
    a = linear_probe(_good(ytr, c, noise=2.0), ytr, _good(yva, c, noise=2.0), yva, c, FAST)
    b = linear_probe(_good(ytr, c, noise=2.0), ytr, _good(yva, c, noise=2.0), yva, c, FAST)
    assert a == b
    huge = LinearRecipe(epochs=2, lr=1e30, batch_size=64, milestones=())
    with pytest.raises(FloatingPointError, match="diverged"):
        linear_probe(1e20 * _good(ytr, c), ytr, _good(yva, c), yva, c, huge)


def test_recipe_rejects_unknown_normalisation():
    with pytest.raises(ValueError, match="normalize"):
        LinearRecipe(normalize="bn")


# ------------------------------------------------------------------------------------------
# Localization
# ------------------------------------------------------------------------------------------
def test_grid_boxes_tile_the_image_row_major():
    boxes = grid_boxes(96, 90, 3)
    assert boxes.shape == (9, 4)
    torch.testing.assert_close(boxes[0], torch.tensor([0.0, 0.0, 30.0, 32.0]))
    torch.testing.assert_close(boxes[5], torch.tensor([60.0, 32.0, 90.0, 64.0]))  # row 1, col 2
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum()
    assert area.item() == pytest.approx(96 * 90)


@pytest.mark.slow
def test_localization_probe_good_near_100_random_near_chance():
    m = 9
    ytr, yva = cell_labels(60, m), cell_labels(30, m)
    assert ytr[:10].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 0]
    good = localization_probe(_good(ytr, m), _good(yva, m), m, FAST)
    assert good["Loc"] > 98
    g = torch.Generator().manual_seed(5)
    rand = localization_probe(
        torch.randn(540, 64, generator=g), torch.randn(270, 64, generator=g), m, FAST
    )
    assert abs(rand["Loc"] - 100 / m) < 10


def _object_features(cells: torch.Tensor, m: int, seed: int, signal: float):
    """Per-cell features; the object's cell gets ``signal`` along a fixed direction."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(cells), m, 32, generator=g)
    x[torch.arange(len(cells)), cells, 0] += signal
    return x.view(-1, 32)


def test_object_cell_probe_good_near_100_random_near_chance():
    m = 9
    ctr, cva = _labels(300, m, 1), _labels(150, m, 2)
    feats = lambda s: (_object_features(ctr, m, 1, s), _object_features(cva, m, 2, s))  # noqa
    tr, va = feats(8.0)
    good = object_cell_probe(tr, ctr, va, cva, m, FAST)
    assert good["ObjLoc"] > 98
    tr, va = feats(0.0)
    rand = object_cell_probe(tr, ctr, va, cva, m, FAST)
    assert abs(rand["ObjLoc"] - 100 / m) < 10


def test_object_cells_follow_resize_and_centre_crop():
    recs = [
        {"bbox": [0, 0, 10, 10], "width": 96, "height": 96},  # top-left
        {"bbox": [80, 40, 96, 56], "width": 96, "height": 96},  # middle row, right
        {"bbox": [140, 0, 160, 20], "width": 200, "height": 100},  # cropped away: clamped right
    ]
    assert object_cells(recs, 96, 96).tolist() == [0, 5, 2]
    # Shorter side 100 -> 50: the 200 x 100 image becomes 100 x 50, centre crop 50 x 50.
    assert object_cells(recs[2:], 50, 50).tolist() == [2]


# ------------------------------------------------------------------------------------------
# SVM
# ------------------------------------------------------------------------------------------
def test_average_precision_known_values():
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    ap, ap11 = average_precision(scores, np.array([1, 1, -1, -1]))
    assert ap == pytest.approx(100.0) and ap11 == pytest.approx(100.0)
    # Ranking: +, -, +: precision 1 at recall 0.5, 2/3 at recall 1.
    ap, ap11 = average_precision(scores[:3], np.array([1, -1, 1]))
    assert ap == pytest.approx(100 * (0.5 * 1 + 0.5 * 2 / 3))
    assert ap11 == pytest.approx(100 * (6 * 1 + 5 * 2 / 3) / 11)
    # Ignored (0) samples do not count, whatever their score.
    ap, _ = average_precision(scores, np.array([1, 0, 1, -1]))
    assert ap == pytest.approx(100.0)


def test_svm_readout_good_near_100_random_near_prevalence():
    c, n = 4, 160
    ytr, yva = _labels(n, c, 1), _labels(n, c, 2)
    targets = lambda y: np.where(np.eye(c)[y.numpy()] > 0, 1, -1).astype(np.int8)  # noqa: E731
    feats = lambda y, s: {"res4": _good(y, c, 32, 0.3, s), "res5": torch.randn(len(y), 16)}  # noqa
    torch.manual_seed(0)
    out = svm_readout(feats(ytr, 0), targets(ytr), feats(yva, 0), targets(yva), costs=(0.1, 1.0))
    assert out["mAP_res4"] > 98 and out["mAP11_res4"] > 98
    assert out["mAP_res5"] < 50  # random: about the prevalence 1/4
    assert all(r["cost"] in (0.1, 1.0) for r in out["per_class"]["res4"])


def test_image_level_targets_single_label_and_voc_difficult(tmp_path):
    single = image_level_targets([{"label": 2}, {"label": 0}], ["a", "b", "c"])
    assert single.tolist() == [[-1, -1, 1], [1, -1, -1]]
    # A VOC-style record: 'b' only difficult -> ignored (0); 'a' easy -> +1; 'c' absent -> -1.
    os.makedirs(tmp_path / "Annotations")
    root = ET.Element("annotation")
    for name, difficult in (("a", 0), ("b", 1)):
        o = ET.SubElement(root, "object")
        ET.SubElement(o, "name").text = name
        ET.SubElement(o, "difficult").text = str(difficult)
    ET.ElementTree(root).write(tmp_path / "Annotations" / "img1.xml")
    MetadataCatalog.get("t_voc_like").set(dirname=str(tmp_path))
    record = {"image_id": "img1", "annotations": [{"category_id": 0}, {"category_id": 1}]}
    assert image_level_targets([record], ["a", "b", "c"], "t_voc_like").tolist() == [[1, 0, -1]]


# ------------------------------------------------------------------------------------------
# Augmented-view retrieval
# ------------------------------------------------------------------------------------------
def test_view_retrieval_invariant_features_100_random_near_chance():
    from insloc_detco.readout.views import view_retrieval_top1

    g = torch.Generator().manual_seed(0)
    identity = torch.randn(500, 64, generator=g)  # what a view-invariant feature would see
    a = {
        "res4": identity + 0.05 * torch.randn(500, 64, generator=g),
        "res5": torch.randn(500, 64, generator=g),
    }
    b = {
        "res4": identity + 0.05 * torch.randn(500, 64, generator=g),
        "res5": torch.randn(500, 64, generator=g),
    }
    out = view_retrieval_top1(a, b)
    assert out["top1_res4"] == 100.0
    assert out["top1_res5"] < 2.0  # chance 0.2 %
    assert view_retrieval_top1(a, b, chunk=7) == out  # compared in blocks: the same answer
    # Row order is the pairing: shuffling view B's rows breaks it.
    perm = torch.randperm(500, generator=g)
    assert view_retrieval_top1({"res4": a["res4"]}, {"res4": b["res4"][perm]})["top1_res4"] < 2
    with pytest.raises(ValueError, match="shapes"):
        view_retrieval_top1({"res4": a["res4"]}, {"res4": b["res4"][:10]})


@pytest.mark.slow
def test_view_transform_is_the_pretraining_augmentation_and_seeded(tmp_path):
    from PIL import Image

    from insloc_detco.readout.features import ReadoutImages
    from insloc_detco.readout.views import pretraining_view_transform

    rng = np.random.default_rng(0)
    records = []
    for i in range(3):
        path = str(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
        records.append({"file_name": path})
    view = pretraining_view_transform(32)
    first = ReadoutImages(records, view, seed=100)
    again = ReadoutImages(records, view, indices=[2, 1, 0], seed=100)  # other order, same views
    other = ReadoutImages(records, view, seed=200)
    for i in range(3):
        x, idx = first[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and idx == i
        assert torch.equal(x, again[2 - i][0])
        assert not torch.equal(x, other[i][0])
    # Many views of one image vary as MoCo v2's do: some grayscale (R = G = B) ones, not all.
    gray = [
        bool((v[0] == v[1]).all() and (v[1] == v[2]).all())
        for v in (ReadoutImages(records[:1], view, seed=s)[0][0] for s in range(200))
    ]
    assert 0.1 < np.mean(gray) < 0.3  # p 0.2
