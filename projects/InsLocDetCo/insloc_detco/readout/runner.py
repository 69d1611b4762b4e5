"""
One command per readout protocol (``eval_readout.py {knn,linear,loc,svm,views}``): check the
data and the weights in the launching process, then extract features and run the protocol in every
launched process (``detectron2.engine.launch``: GPUs, or CPU processes over gloo), and write
``results.json`` / ``results.md`` from the main process.
"""

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..engine.launch import launch
from ..transfer.converter import ConversionError
from .datasets import class_labels, get_readout_dataset, image_level_targets
from .encoder import RANDOM_INIT, STAGES, ReadoutError, build_readout_encoder
from .feature_store import FeatureStore
from .features import eval_transform, extract_features, extract_shard, image_batches
from .knn import sharded_knn_accuracy
from .linear import LinearRecipe, linear_probe, train_linear_protocol
from .localization import grid_boxes, loc_readout
from .results import machine_description, merge_results, now, result_key
from .stage_pooling import MultiStagePooling, squash_transform, stage_pooling_mode
from .svm import DEFAULT_COSTS, svm_readout
from .views import view_retrieval

__all__ = [
    "PROTOCOLS",
    "ReadoutSettings",
    "ReadoutData",
    "load_readout_data",
    "default_output_dir",
    "run_readouts",
    "readout_one",
]

logger = logging.getLogger(__name__)

PROTOCOLS = ("knn", "linear", "loc", "svm", "views")


@dataclass
class ReadoutSettings:
    """
    Everything a readout run needs besides the weights. Defaults: the papers' protocols
    (MoCo linear, kNN k 20/200 T 0.07, InsLoc M = 9, DetCo VOC07 SVM on res2..res5).
    """

    protocol: str
    train: str
    val: str
    layout: str = "c4"
    resize: Optional[int] = None  # None: the data set's image_size, else 256
    crop: Optional[int] = None  # None: the data set's image_size, else 224
    batch_size: int = 64  # images per process when extracting features
    num_workers: int = 4
    device: str = "cpu"
    seed: int = 0
    max_train_images: int = 0  # > 0: the first N training records only (quick checks)
    # > 0: re-estimate the BN statistics on the first N training images before reading out
    # (0: the checkpoint's statistics, the papers' protocol). See ReadoutEncoder.
    precise_bn: int = 0
    opts: Sequence[str] = ()  # KEY VALUE overrides of the readout network's config
    # knn, linear --cached, loc: per-process feature shards on disk (None: <output dir>/features)
    feature_dir: Optional[str] = None
    feature_dtype: str = "float32"  # or "float16": half the disk
    keep_features: bool = False
    # kNN
    ks: Sequence[int] = (20, 200)
    temperature: float = 0.07
    # linear and loc classifiers
    recipe: LinearRecipe = field(default_factory=LinearRecipe)
    cached: bool = False  # linear: train on features extracted once (no augmentation)
    # loc
    grid: int = 3
    # svm (and views)
    stages: Sequence[str] = STAGES
    costs: Sequence[float] = DEFAULT_COSTS
    folds: int = 3
    svm_jobs: int = -1  # processes for the SVM fits (-1: one per CPU)

    def input_size(self, dataset: str):
        """(resize, crop): as given, else the data set's own size, else MoCo's 256 / 224."""
        from detectron2.data import MetadataCatalog

        size = MetadataCatalog.get(dataset).get("image_size", None)
        resize = self.resize or size or 256
        crop = self.crop or size or 224
        return resize, crop

    def as_dict(self) -> Dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "recipe"}
        d["recipe"] = self.recipe.as_dict()
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def default_output_dir(weights: str) -> str:
    """``readout/`` next to a checkpoint; ``output/readout_random_init`` for random init."""
    if weights == RANDOM_INIT:
        return os.path.join("output", "readout_random_init")
    return os.path.join(os.path.dirname(os.path.abspath(weights)), "readout")


@dataclass
class ReadoutData:
    """
    The labelled data of a run, resolved once in the launching process and handed to the
    launched ones (spawned processes do not see data sets or metadata registered at run time).

    Attributes:
        train, val: records; classes: class names.
        resize, crop: the input size (from the settings or the data set's ``image_size``).
        train_targets, val_targets: (N, C) image-level +1 / -1 / 0 targets (svm only).
    """

    train: List[Dict]
    val: List[Dict]
    classes: List[str]
    resize: int
    crop: int
    train_targets: Optional[np.ndarray] = None
    val_targets: Optional[np.ndarray] = None


def load_readout_data(s: ReadoutSettings) -> ReadoutData:
    train, classes = get_readout_dataset(s.train)
    val, val_classes = get_readout_dataset(s.val)
    if list(classes) != list(val_classes):
        raise ReadoutError(f"'{s.train}' and '{s.val}' have different classes.")
    if s.max_train_images > 0:
        train = train[: s.max_train_images]
    if s.protocol in ("knn", "linear"):  # single-label protocols: fail now, not in a worker
        class_labels(train, s.train)
        class_labels(val, s.val)
    resize, crop = s.input_size(s.train)
    d = ReadoutData(train, val, classes, resize, crop)
    if s.protocol == "svm":
        d.train_targets = image_level_targets(train, classes, s.train)
        d.val_targets = image_level_targets(val, classes, s.val)
    return d


# ------------------------------------------------------------------------------------------
# The protocols, in every process (features are extracted in parallel; knn, linear and loc keep
# each process's features on disk and train / compare across the processes; the SVMs are
# fitted by the main process)
# ------------------------------------------------------------------------------------------
def _store(s: ReadoutSettings, output_dir: str) -> FeatureStore:
    root = s.feature_dir or os.path.join(output_dir, "features")
    return FeatureStore(root, s.feature_dtype, s.keep_features)


def _shard(store: FeatureStore, encoder, s: ReadoutSettings, d: ReadoutData, split: str, **kw):
    records = d.train if split == "train" else d.val
    return extract_shard(store, encoder, records, eval_transform(d.resize, d.crop), split,
                         batch_size=s.batch_size, num_workers=s.num_workers, **kw)  # fmt: skip


def _knn(encoder, s: ReadoutSettings, d: ReadoutData, output_dir: str) -> Dict:
    # Bank and queries stay sharded over the processes, on disk.
    with _store(s, output_dir) as store:
        bank, queries = _shard(store, encoder, s, d, "train"), _shard(store, encoder, s, d, "val")
        return sharded_knn_accuracy(
            bank.arrays["res5"], class_labels(d.train)[bank.index], queries.arrays["res5"],
            class_labels(d.val)[queries.index], len(d.classes), s.ks, s.temperature,
            device=encoder.device,
        )  # fmt: skip


def _linear(encoder, s: ReadoutSettings, d: ReadoutData, output_dir: str) -> Dict:
    train_y, val_y = class_labels(d.train), class_labels(d.val)
    if not s.cached:
        ckpt = os.path.join(output_dir, "linear_checkpoint.pth")
        return train_linear_protocol(encoder, d.train, train_y, d.val, val_y, len(d.classes),
                                     s.recipe, d.crop, d.resize, s.num_workers, ckpt)  # fmt: skip
    with _store(s, output_dir) as store:
        ftr, fva = _shard(store, encoder, s, d, "train"), _shard(store, encoder, s, d, "val")
        return linear_probe(
            ftr.arrays["res5"], torch.as_tensor(train_y[ftr.index]), fva.arrays["res5"],
            torch.as_tensor(val_y[fva.index]), len(d.classes), s.recipe, True, encoder.device,
        )  # fmt: skip


def _loc(encoder, s: ReadoutSettings, d: ReadoutData, output_dir: str) -> Dict:
    boxes = grid_boxes(d.crop, d.crop, s.grid)
    # One backbone pass per image gives the cells' features and the whole image's (for Cls).
    with _store(s, output_dir) as store:
        ftr = _shard(store, encoder, s, d, "train", boxes=boxes)
        fva = _shard(store, encoder, s, d, "val", boxes=boxes)
        return loc_readout(ftr, fva, d.train, d.val, len(d.classes), s.grid, s.recipe, d.resize,
                           d.crop, encoder.device)  # fmt: skip


def _svm(encoder, s: ReadoutSettings, d: ReadoutData) -> Dict:
    # DetCo's extraction: squashed to crop x crop, per-stage pooling to ~9k dimensions.
    logger.info(f"[svm] {stage_pooling_mode(d.crop)} pooling at {d.crop} px")
    kw = dict(stages=s.stages, forward=MultiStagePooling(s.stages), gather="main",
              batch_size=s.batch_size, num_workers=s.num_workers)  # fmt: skip
    ftr = extract_features(encoder, d.train, squash_transform(d.resize, d.crop), name=s.train, **kw)
    fva = extract_features(encoder, d.val, squash_transform(d.resize, d.crop), name=s.val, **kw)
    if not comm.is_main_process():
        return {}
    return svm_readout(
        {k: ftr[k] for k in s.stages}, d.train_targets, {k: fva[k] for k in s.stages},
        d.val_targets, s.costs, s.folds, s.seed, s.svm_jobs,
    )  # fmt: skip


def _views(encoder, s: ReadoutSettings, d: ReadoutData) -> Dict:
    # Two views of every validation image (labels unused).
    return view_retrieval(encoder, d.val, d.crop, s.stages, s.seed, s.batch_size,
                          s.num_workers, s.val)  # fmt: skip


def readout_one(
    weights: str, s: ReadoutSettings, output_dir: str, data: Optional[ReadoutData] = None
) -> Dict:
    """
    Run one protocol for one weights file in this process (of a launched group).

    Args:
        data: from :func:`load_readout_data` (None: loaded here).
    Returns:
        the result entry (main process; {} elsewhere), also merged into ``output_dir``.
    """
    start = time.perf_counter()
    torch.manual_seed(s.seed)
    if comm.is_main_process():
        os.makedirs(output_dir, exist_ok=True)
    d = data or load_readout_data(s)
    encoder, report = build_readout_encoder(weights, s.layout, s.device, s.seed, s.opts)
    if s.precise_bn > 0:
        boxes = grid_boxes(d.crop, d.crop, s.grid) if s.protocol == "loc" else None
        batches = image_batches(d.train[: s.precise_bn], eval_transform(d.resize, d.crop),
                                s.batch_size, s.num_workers)  # fmt: skip
        encoder.recompute_bn_statistics(batches, boxes)
    logger.info(f"[{s.protocol}] {report.summary()}; {len(d.train)} -> {len(d.val)} images "
                f"at {d.crop} px")  # fmt: skip
    if s.protocol == "knn":
        metrics = _knn(encoder, s, d, output_dir)
    elif s.protocol == "linear":
        metrics = _linear(encoder, s, d, output_dir)
    elif s.protocol == "loc":
        metrics = _loc(encoder, s, d, output_dir)
    elif s.protocol == "svm":
        metrics = _svm(encoder, s, d)
    elif s.protocol == "views":
        metrics = _views(encoder, s, d)
    else:
        raise ReadoutError(f"Unknown protocol '{s.protocol}'; choose one of {PROTOCOLS}.")
    comm.synchronize()
    if not comm.is_main_process():
        return {}
    per_class = metrics.pop("per_class", None)
    entry = {
        "protocol": s.protocol,
        "weights": weights,
        "weights_loaded": report.summary(),
        "meta_architecture": report.meta_architecture,
        "layout": s.layout,
        "train": s.train,
        "val": s.val,
        "num_train": len(d.train),
        "num_val": len(d.val),
        "num_classes": len(d.classes),
        "input_size": [d.resize, d.crop],
        "metrics": metrics,
        "settings": s.as_dict(),
        "world_size": comm.get_world_size(),
        "wall_s": round(time.perf_counter() - start, 1),
        "machine": machine_description(),
        "date": now(),
    }
    if per_class is not None:
        entry["per_class"] = {"classes": d.classes, **per_class}
    key = result_key(s.protocol, weights, s.train, s.val, s.layout)
    merge_results(output_dir, {key: entry})
    logger.info(f"[{s.protocol}] {os.path.basename(weights)}: "
                + ", ".join(f"{k} {v:.1f}" for k, v in metrics.items()))  # fmt: skip
    return entry


def _worker(weights_list: List[str], s: ReadoutSettings, output_dirs: List[str], data: ReadoutData):
    setup_logging(comm.get_rank())
    for weights, out in zip(weights_list, output_dirs):
        readout_one(weights, s, out, data)


def setup_logging(rank: int = 0):
    for name, abbrev in (("detectron2", "d2"), ("insloc_detco", None)):
        setup_logger(distributed_rank=rank, name=name, abbrev_name=abbrev)


def check_inputs(weights_list: Sequence[str], s: ReadoutSettings, load_weights: bool = True):
    """
    Fail in the launching process, before any worker starts: data, weights, settings.
    ``load_weights``: also read every weights file into the readout network (skipped when the
    readout runs in this process anyway).

    Returns:
        the :class:`ReadoutData`, read once here and handed to the launched processes.
    """
    if s.protocol not in PROTOCOLS:
        raise ReadoutError(f"Unknown protocol '{s.protocol}'; choose one of {PROTOCOLS}.")
    data = load_readout_data(s)
    bad = [s for s in s.stages if s not in STAGES]
    if bad:
        raise ReadoutError(f"Unknown stage(s) {bad}; choose from {STAGES}.")
    for w in weights_list:
        if w != RANDOM_INIT and not os.path.isfile(w):
            raise ReadoutError(f"Weights '{w}' do not exist (a .pth, a .pkl, or 'random').")
        if not load_weights:
            continue
        try:
            build_readout_encoder(w, s.layout, "cpu", s.seed, s.opts)
        except ConversionError as e:
            raise ReadoutError(str(e)) from None
    return data


def run_readouts(
    weights_list: Sequence[str],
    s: ReadoutSettings,
    output_dir: Optional[str] = None,
    num_gpus: int = 1,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = "auto",
) -> List[Dict]:
    """
    Args:
        weights_list: checkpoints (.pth), converted .pkl files, or "random".
        s: the protocol and its settings.
        output_dir: where results go (None: :func:`default_output_dir` of each weights).
        num_gpus, num_machines, machine_rank, dist_url: as detectron2's ``launch``.
    Returns:
        the result entries (read back from the output folders).
    """
    data = check_inputs(weights_list, s, load_weights=num_gpus * num_machines > 1)
    dirs = [output_dir or default_output_dir(w) for w in weights_list]
    try:
        launch(_worker, num_gpus, num_machines, machine_rank, dist_url,
               args=(list(weights_list), s, dirs, data))  # fmt: skip
    except ConversionError as e:  # one process: raised here as it is
        raise ReadoutError(str(e)) from None
    import json

    entries = []
    for w, d in zip(weights_list, dirs):
        with open(os.path.join(d, "results.json")) as f:
            entries.append(json.load(f)[result_key(s.protocol, w, s.train, s.val, s.layout)])
    return entries

