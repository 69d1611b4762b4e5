"""
The readout protocols, one table: name -> :class:`ReadoutProtocol` (the function that runs it,
the papers' data, what its records must carry), with the settings and the data every protocol
reads.

A protocol runs in every launched process: features are extracted in parallel. knn,
linear --cached and loc keep each process's features in a shard on disk
(:mod:`.feature_store`) and train or compare across the processes; svm gathers its pooled
features to the main process, which fits the SVMs. The ``*_metrics`` functions compute a
protocol's numbers from features already extracted, each process's shard on disk or features
held in memory, so that a study extracting its features once (the mini benchmark) reads them
out exactly as the protocols do.
"""

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.utils import comm

from .datasets import class_labels, get_readout_dataset, image_level_targets
from .encoder import STAGES, ReadoutError
from .feature_store import FeatureShard, FeatureStore
from .features import eval_transform, extract_features, extract_shard
from .knn import sharded_knn_accuracy
from .linear import LinearRecipe, linear_probe, train_linear_protocol
from .localization import grid_boxes, localization_probe, object_cell_probe, object_cells
from .stage_pooling import MultiStagePooling, squash_transform, stage_pooling_mode
from .svm import DEFAULT_COSTS, svm_readout
from .views import view_retrieval

__all__ = [
    "ReadoutSettings",
    "ReadoutData",
    "load_readout_data",
    "Features",
    "knn_metrics",
    "linear_metrics",
    "cell_metrics",
    "ReadoutProtocol",
    "PROTOCOLS",
    "get_protocol",
]

logger = logging.getLogger(__name__)


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
    """The data of ``s``, checked for what its protocol needs (in the launching process)."""
    protocol = get_protocol(s.protocol)
    train, classes = get_readout_dataset(s.train)
    val, val_classes = get_readout_dataset(s.val)
    if list(classes) != list(val_classes):
        raise ReadoutError(f"'{s.train}' and '{s.val}' have different classes.")
    if s.max_train_images > 0:
        train = train[: s.max_train_images]
    if protocol.single_label:  # fail now, not in a worker
        class_labels(train, s.train)
        class_labels(val, s.val)
    resize, crop = s.input_size(s.train)
    d = ReadoutData(train, val, classes, resize, crop)
    if protocol.image_targets:
        d.train_targets = image_level_targets(train, classes, s.train)
        d.val_targets = image_level_targets(val, classes, s.val)
    return d


# ------------------------------------------------------------------------------------------
# Numbers from extracted features: every process passes its own part (with one process, all
# of it), a shard on disk or features in memory
# ------------------------------------------------------------------------------------------
# A :class:`.feature_store.FeatureShard` (memory-mapped), or features in memory as
# :func:`.features.extract_features` returns them: {"index": (n,), stage: (n, C),
# "boxes": (n * M, D)} tensors (without "index": every record, in order).
Features = Union[FeatureShard, Dict[str, torch.Tensor]]


def _parts(features: Features, records: List[Dict]) -> Tuple[np.ndarray, Mapping]:
    """(record indices (n,), {feature: (n * rows, D) tensor or memory-mapped array})."""
    if isinstance(features, FeatureShard):
        return features.index, features.arrays
    index = features.get("index")
    return np.arange(len(records)) if index is None else np.asarray(index), features


def _distributed() -> bool:
    return comm.get_world_size() > 1


def knn_metrics(
    bank: Features,
    queries: Features,
    d: ReadoutData,
    ks: Sequence[int],
    temperature: float,
    device,
) -> Dict[str, float]:
    """Weighted kNN of the val images' class among the training images, pooled res5; bank
    and queries compared block by block (:func:`.knn.sharded_knn_accuracy`).

    Args:
        bank, queries: this process's training / validation features.
        device: where the similarities are computed.
    """
    bank_index, bank_x = _parts(bank, d.train)
    query_index, query_x = _parts(queries, d.val)
    return sharded_knn_accuracy(
        bank_x["res5"],
        class_labels(d.train)[bank_index],
        query_x["res5"],
        class_labels(d.val)[query_index],
        len(d.classes),
        ks,
        temperature,
        device=device,
    )


def linear_metrics(
    train: Features, val: Features, d: ReadoutData, recipe: LinearRecipe, device="cpu"
) -> Dict[str, float]:
    """Linear classification on cached pooled res5, trained across the processes:
    {"top1", "top5"}."""
    train_index, train_x = _parts(train, d.train)
    val_index, val_x = _parts(val, d.val)
    return linear_probe(
        train_x["res5"],
        torch.as_tensor(class_labels(d.train)[train_index]),
        val_x["res5"],
        torch.as_tensor(class_labels(d.val)[val_index]),
        len(d.classes),
        recipe,
        _distributed(),
        device,
    )


def cell_metrics(
    train: Features, val: Features, d: ReadoutData, grid: int, recipe: LinearRecipe, device="cpu"
) -> Dict[str, float]:
    """InsLoc's linear localization ("Loc": which of the grid x grid cells a box feature is)
    and, when every record has its object's ``bbox``, which cell holds the object ("ObjLoc")."""
    m = grid * grid
    train_index, train_x = _parts(train, d.train)
    val_index, val_x = _parts(val, d.val)
    out = localization_probe(train_x["boxes"], val_x["boxes"], m, recipe, _distributed(), device)
    if all("bbox" in r for r in d.train) and all("bbox" in r for r in d.val):
        train_cells = object_cells(d.train, d.resize, d.crop, grid)[torch.as_tensor(train_index)]
        val_cells = object_cells(d.val, d.resize, d.crop, grid)[torch.as_tensor(val_index)]
        out.update(
            object_cell_probe(
                train_x["boxes"],
                train_cells,
                val_x["boxes"],
                val_cells,
                m,
                recipe,
                _distributed(),
                device,
            )
        )
    return out


# ------------------------------------------------------------------------------------------
# The protocols: (encoder, settings, data, output folder) -> metrics in the main process (the
# others may get {})
# ------------------------------------------------------------------------------------------
def _store(s: ReadoutSettings, output_dir: str) -> FeatureStore:
    root = s.feature_dir or os.path.join(output_dir, "features")
    return FeatureStore(root, s.feature_dtype, s.keep_features)


def _shard(store: FeatureStore, encoder, s: ReadoutSettings, d: ReadoutData, split: str, **kw):
    """This process's features of ``split`` ("train" or "val"), written to ``store``."""
    records = d.train if split == "train" else d.val
    transform = eval_transform(d.resize, d.crop)
    return extract_shard(
        store,
        encoder,
        records,
        transform,
        split,
        batch_size=s.batch_size,
        num_workers=s.num_workers,
        **kw,
    )


def _knn(encoder, s: ReadoutSettings, d: ReadoutData, output_dir: str) -> Dict:
    # Bank and queries stay sharded over the processes, on disk; the similarities on the
    # accelerator when there is one.
    with _store(s, output_dir) as store:
        bank, queries = _shard(store, encoder, s, d, "train"), _shard(store, encoder, s, d, "val")
        return knn_metrics(bank, queries, d, s.ks, s.temperature, encoder.device)


def _linear(encoder, s: ReadoutSettings, d: ReadoutData, output_dir: str) -> Dict:
    if not s.cached:
        ckpt = os.path.join(output_dir, "linear_checkpoint.pth")
        train_y, val_y = class_labels(d.train), class_labels(d.val)
        return train_linear_protocol(
            encoder,
            d.train,
            train_y,
            d.val,
            val_y,
            len(d.classes),
            s.recipe,
            crop=d.crop,
            resize=d.resize,
            num_workers=s.num_workers,
            checkpoint=ckpt,
        )
    with _store(s, output_dir) as store:
        train, val = _shard(store, encoder, s, d, "train"), _shard(store, encoder, s, d, "val")
        return linear_metrics(train, val, d, s.recipe, encoder.device)


def _loc(encoder, s: ReadoutSettings, d: ReadoutData, output_dir: str) -> Dict:
    boxes = grid_boxes(d.crop, d.crop, s.grid)
    # One backbone pass per image gives the cells' features and the whole image's (for Cls).
    with _store(s, output_dir) as store:
        train = _shard(store, encoder, s, d, "train", boxes=boxes)
        val = _shard(store, encoder, s, d, "val", boxes=boxes)
        out = cell_metrics(train, val, d, s.grid, s.recipe, encoder.device)
        if "label" in d.train[0]:
            # "Cls (cached)": the loc recipe on cached res5, not MoCo's augmented linear
            # protocol behind InsLoc's Table 3a Cls (that is `linear`).
            out["Cls"] = linear_metrics(train, val, d, s.recipe, encoder.device)["top1"]
        return out


def _svm(encoder, s: ReadoutSettings, d: ReadoutData, output_dir: str) -> Dict:
    # DetCo's extraction: squashed to crop x crop, each stage pooled to ~9k dimensions; the
    # features gathered to the main process, which fits the SVMs.
    logger.info(f"[svm] {stage_pooling_mode(d.crop)} pooling at {d.crop} px")
    transform = squash_transform(d.resize, d.crop)
    kw = dict(
        stages=s.stages,
        forward=MultiStagePooling(s.stages),
        gather="main",
        batch_size=s.batch_size,
        num_workers=s.num_workers,
    )
    train = extract_features(encoder, d.train, transform, name=s.train, **kw)
    val = extract_features(encoder, d.val, transform, name=s.val, **kw)
    if not comm.is_main_process():
        return {}
    return svm_readout(
        {k: train[k] for k in s.stages},
        d.train_targets,
        {k: val[k] for k in s.stages},
        d.val_targets,
        s.costs,
        s.folds,
        s.seed,
        s.svm_jobs,
    )


def _views(encoder, s: ReadoutSettings, d: ReadoutData, output_dir: str) -> Dict:
    # Two views of every validation image (labels unused).
    return view_retrieval(
        encoder, d.val, d.crop, s.stages, s.seed, s.batch_size, s.num_workers, s.val
    )


@dataclass(frozen=True)
class ReadoutProtocol:
    """
    Attributes:
        name: what ``eval_readout.py`` takes.
        run: (encoder, settings, data, output folder) -> metrics, in every process.
        data: the papers' (train, val) data sets, the defaults.
        single_label: its records need one class each (checked before launching).
        image_targets: it reads (N, C) image-level targets (``ReadoutData.*_targets``).
        cell_boxes: it reads the grid cells' box features (also when re-estimating BN).
    """

    name: str
    run: Callable[..., Dict]
    data: Tuple[str, str]
    single_label: bool = False
    image_targets: bool = False
    cell_boxes: bool = False


_IMAGENET = ("imagenet_cls_train", "imagenet_cls_val")
PROTOCOLS = OrderedDict(
    (p.name, p)
    for p in (
        ReadoutProtocol("knn", _knn, _IMAGENET, single_label=True),
        ReadoutProtocol("linear", _linear, _IMAGENET, single_label=True),
        ReadoutProtocol("loc", _loc, _IMAGENET, cell_boxes=True),
        ReadoutProtocol("svm", _svm, ("voc_2007_trainval", "voc_2007_test"), image_targets=True),
        ReadoutProtocol("views", _views, _IMAGENET),  # train: --precise-bn only
    )
)


def get_protocol(name: str) -> ReadoutProtocol:
    if name not in PROTOCOLS:
        raise ReadoutError(f"Unknown protocol '{name}'; choose one of {tuple(PROTOCOLS)}.")
    return PROTOCOLS[name]
