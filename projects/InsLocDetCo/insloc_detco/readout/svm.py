"""
DetCo's per-stage VOC07 SVM classification (Xie et al. 2021, Table 12; the protocol of Goyal et
al. 2019, "Scaling and Benchmarking Self-Supervised Visual Representation Learning"): frozen,
globally average-pooled features of res2, res3, res4 and res5 of VOC07 trainval; for every class
a one-vs-rest linear SVM, its cost C chosen by k-fold cross-validation on trainval; mean AP over
the classes on VOC07 test, per stage.

Choices: scikit-learn's liblinear (``LinearSVC``, squared hinge, L2, positives weighted 2:1 as
the benchmark does); features L2-normalised per image, so one cost sweep fits every stage;
images whose only objects of a class are 'difficult' are ignored for that class (target 0).
AP is computed from the precision-recall curve with detectron2's ``voc_ap``: the VOC07 11-point
AP ("mAP11", the benchmark's number) and the area under the curve ("mAP").
"""

import logging
from typing import Dict, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.evaluation.pascal_voc_evaluation import voc_ap

__all__ = ["DEFAULT_COSTS", "average_precision", "fit_svm", "svm_per_class", "svm_readout"]

logger = logging.getLogger(__name__)

DEFAULT_COSTS = (0.01, 0.1, 1.0, 10.0, 100.0)


def _linear_svc():
    try:
        from sklearn.svm import LinearSVC
    except ImportError as e:
        raise ImportError(
            "The svm readout needs scikit-learn: pip install scikit-learn (scripts/setup_env.sh "
            "installs it)."
        ) from e
    return LinearSVC


def average_precision(scores: np.ndarray, targets: np.ndarray) -> Tuple[float, float]:
    """
    Args:
        scores: (N,) classifier scores; targets: (N,) +1 / -1, 0 = ignored.
    Returns:
        (AP as the area under the PR curve, VOC07 11-point AP), in %.
    """
    keep = targets != 0
    scores, positive = scores[keep], targets[keep] > 0
    if positive.sum() == 0:
        return float("nan"), float("nan")
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(positive[order])
    fp = np.cumsum(~positive[order])
    rec = tp / positive.sum()
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return 100.0 * voc_ap(rec, prec, False), 100.0 * voc_ap(rec, prec, True)


def fit_svm(x: np.ndarray, targets: np.ndarray, cost: float):
    """One-vs-rest linear SVM on (N, D) features and +1/-1 targets (0 rows dropped)."""
    keep = targets != 0
    svm = _linear_svc()(
        C=cost, class_weight={1: 2, -1: 1}, loss="squared_hinge", penalty="l2", dual=True,
        max_iter=2000, tol=1e-4,
    )  # fmt: skip
    return svm.fit(x[keep], targets[keep])


def svm_per_class(
    train_x: np.ndarray, train_t: np.ndarray, val_x: np.ndarray, val_t: np.ndarray,
    costs: Sequence[float], folds: int = 3, seed: int = 0,
) -> Dict[str, float]:  # fmt: skip
    """
    Choose the cost by ``folds``-fold cross-validation (mean AP) on the training set, refit on
    all of it, score the validation set.

    Returns:
        {"AP", "AP11", "cost"}.
    """
    rng = np.random.default_rng(seed)
    fold_of = rng.permutation(len(train_x)) % folds
    best_cost, best = costs[0], -1.0
    if len(costs) > 1:
        for cost in costs:
            aps = []
            for f in range(folds):
                tr, te = fold_of != f, fold_of == f
                if (train_t[tr] > 0).sum() == 0 or (train_t[te] > 0).sum() == 0:
                    continue
                svm = fit_svm(train_x[tr], train_t[tr], cost)
                aps.append(average_precision(svm.decision_function(train_x[te]), train_t[te])[0])
            score = float(np.mean(aps)) if aps else -1.0
            if score > best:
                best_cost, best = cost, score
    svm = fit_svm(train_x, train_t, best_cost)
    ap, ap11 = average_precision(svm.decision_function(val_x), val_t)
    return {"AP": ap, "AP11": ap11, "cost": best_cost}


def svm_readout(
    train_feats: Dict[str, torch.Tensor], train_targets: np.ndarray,
    val_feats: Dict[str, torch.Tensor], val_targets: np.ndarray,
    costs: Sequence[float] = DEFAULT_COSTS, folds: int = 3, seed: int = 0,
) -> Dict[str, float]:  # fmt: skip
    """
    Args:
        train_feats, val_feats: {stage: (N, C_stage)} pooled features.
        train_targets, val_targets: (N, num_classes) +1 / -1 / 0 (see ``image_level_targets``).
    Returns:
        {"mAP_<stage>", "mAP11_<stage>"} (%) for every stage, and the per-class results under
        "per_class" ({stage: [{"AP", "AP11", "cost"}, ...]}).
    """
    out, per_class = {}, {}
    for stage in train_feats:
        xtr = F.normalize(train_feats[stage].double(), dim=1).numpy()
        xva = F.normalize(val_feats[stage].double(), dim=1).numpy()
        rows = []
        for c in range(train_targets.shape[1]):
            rows.append(svm_per_class(xtr, train_targets[:, c], xva, val_targets[:, c], costs,
                                      folds, seed))  # fmt: skip
        per_class[stage] = rows
        out[f"mAP_{stage}"] = float(np.nanmean([r["AP"] for r in rows]))
        out[f"mAP11_{stage}"] = float(np.nanmean([r["AP11"] for r in rows]))
        logger.info(f"SVM {stage}: mAP {out[f'mAP_{stage}']:.1f}, "
                    f"11-point {out[f'mAP11_{stage}']:.1f}")  # fmt: skip
    out["per_class"] = per_class
    return out
