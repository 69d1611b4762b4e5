"""DetCo's VOC07 SVM protocol piece by piece (CPU, small fixtures): the per-stage pooling and its
dimensions, the 224 x 224 resize, the cost list and the cost choice, the stratified folds, the
all-point and 11-point APs, the 'difficult' images."""

import numpy as np
import pytest
import torch

from insloc_detco.readout import svm
from insloc_detco.readout.stage_pooling import (
    MultiStagePooling,
    pool_stage,
    squash_transform,
    stage_pooling_mode,
)

# (channels, side at 224 px) of every stage, and the dimensions DetCo's tools pool them to.
STAGE_MAPS = {"res2": (256, 56), "res3": (512, 28), "res4": (1024, 14), "res5": (2048, 7)}
POOL_DIMS = {"res2": 9216, "res3": 8192, "res4": 9216, "res5": 8192}


def test_stage_pooling_dimensions_and_kernels_at_224():
    g = torch.Generator().manual_seed(0)
    for stage, (c, side) in STAGE_MAPS.items():
        x = torch.rand(2, c, side, side, generator=g)
        assert pool_stage(x, stage).shape == (2, POOL_DIMS[stage]), stage
    # The fixed kernels: res2 16 x 16 windows every 8 px (6 x 6), res5 6 x 6 every 1 px (2 x 2).
    x = torch.rand(1, 1, 56, 56, generator=g)
    grid = pool_stage(x, "res2").view(6, 6)
    torch.testing.assert_close(grid[1, 2], x[0, 0, 8:24, 16:32].mean())
    x = torch.rand(1, 1, 7, 7, generator=g)
    torch.testing.assert_close(pool_stage(x, "res5").view(2, 2)[1, 0], x[0, 0, 1:7, 0:6].mean())
    assert stage_pooling_mode(224) == "fixed kernels"


def test_stage_pooling_adapts_to_other_input_sizes():
    # 96 px (demo_cls): maps 24, 12, 6, 3 px, too small for some kernels; same dimensions.
    for stage, (c, side) in STAGE_MAPS.items():
        x = torch.rand(1, c, side * 96 // 224 or 1, side * 96 // 224 or 1)
        assert pool_stage(x, stage).shape == (1, POOL_DIMS[stage]), stage
    assert stage_pooling_mode(96) == "adaptive"
    x = torch.arange(9.0).view(1, 1, 3, 3)  # res5 at 96 px -> adaptive 2 x 2 (overlapping)
    assert pool_stage(x, "res5").tolist() == [[2.0, 3.0, 5.0, 6.0]]
    with pytest.raises(ValueError, match="res6"):
        MultiStagePooling(["res4", "res6"])


def test_svm_images_are_resized_to_224_square_without_crop():
    image = torch.zeros(3, 100, 300, dtype=torch.uint8)
    image[0, :, :30] = 255  # a red band on the left tenth
    out = squash_transform()(image)
    assert out.shape == (3, 224, 224)
    assert out[0, :, 5].min() > 200 and out[0, :, 30].max() < 50  # kept, squeezed to 22 px
    assert out[0, :, 224 - 5].max() == 0  # the right edge stays: nothing was cropped


def test_default_costs_are_detcos_list():
    assert svm.DEFAULT_COSTS[:3] == (1.0, 10.0, 100.0)
    assert svm.DEFAULT_COSTS[3:] == tuple(0.5**k for k in range(4, 20))
    assert len(svm.DEFAULT_COSTS) == 19 and svm.DEFAULT_COSTS[-1] == pytest.approx(1.9073e-6, 1e-4)


def test_all_point_11_point_and_cross_validation_aps_differ_as_defined():
    from sklearn.metrics import average_precision_score

    # Ranking +, -, +, +: precision 1, 1/2, 2/3, 3/4 at recall 1/3, 1/3, 2/3, 1.
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    targets = np.array([1, -1, 1, 1])
    ap, ap11 = svm.average_precision(scores, targets)
    # All-point (their calculate_ap): the interpolated precision 3/4 at recall 2/3 counts.
    assert ap == pytest.approx(100 * (1 / 3 * 1 + 2 / 3 * 3 / 4))
    # 11-point: recall 0, .1, .2, .3 -> 1; .4 ... 1.0 -> 3/4.
    assert ap11 == pytest.approx(100 * (4 * 1 + 7 * 3 / 4) / 11)
    # Cross-validation scores folds with scikit-learn's AP, which does not interpolate.
    sk = average_precision_score(targets, scores)
    assert sk == pytest.approx(1 / 3 * 1 + 1 / 3 * 2 / 3 + 1 / 3 * 3 / 4)
    assert len({round(ap, 6), round(ap11, 6), round(100 * sk, 6)}) == 3


def test_stratified_folds_spread_positives_in_data_order():
    labels = np.array([1] * 9 + [-1] * 21)
    folds = svm.stratified_folds(labels, 3)
    assert len(folds) == 3
    held_out = np.concatenate([h for _, h in folds])
    assert sorted(held_out.tolist()) == list(range(30))  # every image held out once
    for train, held in folds:
        assert (labels[held] > 0).sum() == 3 and (labels[held] < 0).sum() == 7
        assert set(train.tolist()) | set(held.tolist()) == set(range(30))
    # No shuffling: the first fold holds out the first positives and negatives.
    assert folds[0][1].tolist() == [0, 1, 2] + list(range(9, 16))
    with pytest.raises(ValueError, match="3-fold"):
        svm.stratified_folds(np.array([1, 1, -1, -1, -1, -1]), 3)


def test_cost_choice_takes_the_first_best_in_list_order(monkeypatch):
    table = {10.0: 0.8, 0.0625: 0.8, 1.0: 0.5}  # the others 0.1
    monkeypatch.setattr(svm, "cross_validated_ap", lambda x, y, cost, *a: table.get(cost, 0.1))
    x = np.random.default_rng(0).normal(size=(12, 4))
    t = np.array([1, -1] * 6)
    out = svm.svm_per_class(x, t, x, t, svm.DEFAULT_COSTS)
    assert out["cost"] == 10.0 and out["cv_AP"] == pytest.approx(80.0)


def test_difficult_images_are_training_negatives_and_left_out_of_test(monkeypatch):
    assert svm.svm_train_labels(np.array([1, 0, -1, 1])).tolist() == [1, -1, -1, 1]
    # Test: a difficult (0) image ranked first changes nothing.
    assert svm.average_precision(np.array([0.9, 0.8, 0.1]), np.array([0, 1, -1]))[0] == 100.0
    # Training: every fit (3 folds and the final one) sees the difficult images, as negatives.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 5))
    t = np.array([1, -1, 0, -1] * 6)
    seen = []
    fit = svm.fit_svm
    monkeypatch.setattr(svm, "fit_svm", lambda x, y, c, s=0: seen.append(y.copy()) or fit(x, y, c))
    svm.svm_per_class(x, t, x, t, costs=(1.0,))
    assert len(seen) == 4
    assert sum(len(y) for y in seen[:3]) == 2 * 24 and len(seen[3]) == 24
    assert (seen[3] == svm.svm_train_labels(t)).all() and (seen[3] == -1).sum() == 18
