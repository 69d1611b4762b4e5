"""
DetCo's per-stage VOC07 SVM classification (Xie et al. 2021, Table 12), as the authors' tools run
it (DetCo's ``benchmarks/svm_tools``, OpenSelfSup's, after Goyal et al. 2019, "Scaling and
Benchmarking Self-Supervised Visual Representation Learning"):

* features: each stage pooled to ~9k dimensions (:mod:`.stage_pooling`), every row divided by
  its L2 norm + 1e-5, in float64;
* one linear SVM per class and stage: liblinear's ``LinearSVC`` (squared hinge, L2, dual,
  positives weighted 2 : 1, tol 1e-4, at most 2000 iterations), for every cost of
  :data:`DEFAULT_COSTS` (1, 10, 100, 0.5^4 ... 0.5^19);
* the cost of a class: the best mean AP of stratified 3-fold cross-validation on trainval
  (scikit-learn's ``StratifiedKFold`` without shuffling and its ``average_precision_score``,
  what their ``cross_val_score(cv=3, scoring="average_precision")`` computes); the first cost of
  the list wins a tie; the SVM of that cost fitted on all of trainval scores test;
* test AP: the all-point (area under the interpolated precision-recall curve) VOC AP of their
  ``calculate_ap`` ("mAP", the number DetCo reports); the VOC07 11-point AP beside it ("mAP11");
* 'difficult': an image whose only objects of a class are marked difficult (VOC's label 0) is a
  negative when training that class's SVM and is left out when scoring it on test.

Choices where the tools are silent: ``random_state`` of liblinear's coordinate descent is the run's
seed (their tools leave it unseeded); scores are ranked with a stable sort (ties do not occur in
practice). The (class, cost) fits run in parallel processes (their tools: one process per CPU).
"""

import logging
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from detectron2.evaluation.pascal_voc_evaluation import voc_ap

__all__ = [
    "DEFAULT_COSTS",
    "normalize_rows",
    "average_precision",
    "svm_train_labels",
    "stratified_folds",
    "cross_validated_ap",
    "fit_svm",
    "svm_per_class",
    "svm_readout",
]

logger = logging.getLogger(__name__)

# The tools' cost list: "1.0,10.0,100.0" on their command line, then 0.5^4 ... 0.5^19 appended.
DEFAULT_COSTS = (1.0, 10.0, 100.0) + tuple(0.5**k for k in range(4, 20))


def _sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "The svm readout needs scikit-learn: pip install scikit-learn (scripts/setup_env.sh "
            "installs it)."
        ) from e
    from sklearn.metrics import average_precision_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.svm import LinearSVC

    return LinearSVC, StratifiedKFold, average_precision_score


def normalize_rows(x) -> np.ndarray:
    """(N, D) -> float64 rows divided by their L2 norm + 1e-5 (the tools' normalisation)."""
    x = np.asarray(x, dtype=np.float64)
    return x / (np.linalg.norm(x, axis=1) + 1e-5)[:, None]


def average_precision(scores: np.ndarray, targets: np.ndarray) -> Tuple[float, float]:
    """
    Args:
        scores: (N,) classifier scores; targets: (N,) +1 / -1, 0 = left out (difficult).
    Returns:
        (all-point VOC AP, VOC07 11-point AP), in %; NaN without positives.
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


def svm_train_labels(targets: np.ndarray) -> np.ndarray:
    """(N,) +1 / -1 / 0 targets -> the SVM's +1 / -1 labels: difficult (0) images are negatives."""
    return np.where(targets > 0, 1, -1).astype(np.int32)


def stratified_folds(labels: np.ndarray, folds: int = 3) -> List[Tuple[np.ndarray, np.ndarray]]:
    """
    (train rows, held-out rows) of ``folds``-fold cross-validation with the positives spread
    evenly over the folds, in data order (no shuffling: scikit-learn's ``StratifiedKFold``).
    """
    _, stratified_k_fold, _ = _sklearn()
    positives = int((labels > 0).sum())
    if min(positives, len(labels) - positives) < folds:
        raise ValueError(
            f"{positives} positive and {len(labels) - positives} negative training images: "
            f"{folds}-fold cross-validation needs {folds} of each (more training images, or "
            "fewer --folds)."
        )
    return list(stratified_k_fold(n_splits=folds).split(np.zeros(len(labels)), labels))


def fit_svm(x: np.ndarray, labels: np.ndarray, cost: float, seed: int = 0):
    """The tools' one-vs-rest ``LinearSVC`` on (N, D) float64 features and +1 / -1 labels."""
    linear_svc, _, _ = _sklearn()
    svm = linear_svc(
        C=cost,
        class_weight={1: 2, -1: 1},
        intercept_scaling=1.0,
        penalty="l2",
        loss="squared_hinge",
        dual=True,
        tol=1e-4,
        max_iter=2000,
        random_state=seed,
    )
    return svm.fit(x, labels)


def cross_validated_ap(
    x: np.ndarray, labels: np.ndarray, cost: float, folds: int = 3, seed: int = 0
) -> float:
    """Mean over the stratified folds of scikit-learn's average precision (0-1) of the held-out
    rows, the SVM fitted on the others."""
    _, _, sklearn_ap = _sklearn()
    aps = []
    for train, held_out in stratified_folds(labels, folds):
        svm = fit_svm(x[train], labels[train], cost, seed)
        aps.append(sklearn_ap(labels[held_out], svm.decision_function(x[held_out])))
    return float(np.mean(aps))


def _test_ap(train_x, train_labels, val_x, val_targets, cost, seed) -> Tuple[float, float]:
    svm = fit_svm(train_x, train_labels, cost, seed)
    return average_precision(svm.decision_function(val_x), val_targets)


def svm_per_class(
    train_x: np.ndarray,
    train_t: np.ndarray,
    val_x: np.ndarray,
    val_t: np.ndarray,
    costs: Sequence[float] = DEFAULT_COSTS,
    folds: int = 3,
    seed: int = 0,
    n_jobs: int = 1,
) -> Dict[str, float]:
    """
    One class: choose the cost by cross-validation, refit on all of ``train_x``, score ``val_x``.

    Args:
        train_x, val_x: (N, D) normalised features (:func:`normalize_rows`).
        train_t, val_t: (N,) +1 / -1 / 0 targets.
    Returns:
        {"AP", "AP11" (%, test), "cost", "cv_AP" (%, the chosen cost's cross-validation AP)}.
    """
    return _per_class_results(
        train_x, train_t[:, None], val_x, val_t[:, None], costs, folds, seed, n_jobs
    )[0]


def _per_class_results(train_x, train_t, val_x, val_t, costs, folds, seed, n_jobs):
    from joblib import Parallel, delayed

    labels = [svm_train_labels(train_t[:, c]) for c in range(train_t.shape[1])]
    parallel = Parallel(n_jobs=n_jobs)
    cv = parallel(
        delayed(cross_validated_ap)(train_x, labels[c], cost, folds, seed)
        for c in range(len(labels))
        for cost in costs
    )
    cv = np.asarray(cv).reshape(len(labels), len(costs))
    best = cv.argmax(axis=1)  # the first of equal APs, in the order of ``costs``
    test = parallel(
        delayed(_test_ap)(train_x, labels[c], val_x, val_t[:, c], costs[best[c]], seed)
        for c in range(len(labels))
    )
    return [
        {"AP": ap, "AP11": ap11, "cost": costs[b], "cv_AP": 100.0 * float(cv[c, b])}
        for c, ((ap, ap11), b) in enumerate(zip(test, best))
    ]


def svm_readout(
    train_feats: Dict[str, torch.Tensor],
    train_targets: np.ndarray,
    val_feats: Dict[str, torch.Tensor],
    val_targets: np.ndarray,
    costs: Sequence[float] = DEFAULT_COSTS,
    folds: int = 3,
    seed: int = 0,
    n_jobs: int = 1,
) -> Dict[str, float]:
    """
    Args:
        train_feats, val_feats: {stage: (N, D_stage)} pooled features (:mod:`.stage_pooling`).
        train_targets, val_targets: (N, num_classes) +1 / -1 / 0 (see ``image_level_targets``).
        n_jobs: parallel processes for the (class, cost) fits (-1: one per CPU).
    Returns:
        {"mAP_<stage>" (all-point), "mAP11_<stage>" (11-point)} (%) for every stage, and the
        per-class results under "per_class" ({stage: [{"AP", "AP11", "cost", "cv_AP"}, ...]}).
    """
    out, per_class = {}, {}
    for stage in train_feats:
        rows = _per_class_results(
            normalize_rows(train_feats[stage]),
            train_targets,
            normalize_rows(val_feats[stage]),
            val_targets,
            tuple(costs),
            folds,
            seed,
            n_jobs,
        )
        per_class[stage] = rows
        out[f"mAP_{stage}"] = float(np.nanmean([r["AP"] for r in rows]))
        out[f"mAP11_{stage}"] = float(np.nanmean([r["AP11"] for r in rows]))
        logger.info(
            f"SVM {stage} ({train_feats[stage].shape[1]}-d): mAP (all-point) "
            f"{out[f'mAP_{stage}']:.1f}, mAP11 (11-point) {out[f'mAP11_{stage}']:.1f}"
        )
    out["per_class"] = per_class
    return out
