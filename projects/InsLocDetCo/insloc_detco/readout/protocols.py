"""
The readout protocols, one table: name -> :class:`ReadoutProtocol` (the function that runs it,
the papers' data, what its records must carry), with the settings and the data every protocol
reads.

A protocol runs in every launched process: features are extracted in parallel, the small
classifiers are fitted by the main process. The ``*_metrics`` functions compute a protocol's
numbers from features already extracted, so that a study extracting its features once (the
mini benchmark) reads them out exactly as the protocols do.
"""

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.utils import comm

from .datasets import class_labels, get_readout_dataset, image_level_targets
from .encoder import STAGES, ReadoutError
from .features import eval_transform, extract_features
from .knn import knn_accuracy
from .linear import LinearRecipe, linear_probe, train_linear_protocol
from .localization import grid_boxes, localization_probe, object_cell_probe, object_cells
from .svm import DEFAULT_COSTS, svm_readout
from .views import view_retrieval

__all__ = [
    "ReadoutSettings",
    "ReadoutData",
    "load_readout_data",
    "knn_metrics",
    "linear_metrics",
    "cell_metrics",
    "ReadoutProtocol",
    "PROTOCOLS",
    "get_protocol",
]


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
# Numbers from extracted features ({"index": (N,), stage: (N, C), "boxes": (N * M, D)})
# ------------------------------------------------------------------------------------------
def knn_metrics(
    bank: Dict, queries: Dict, d: ReadoutData, ks: Sequence[int], temperature: float, device
) -> Dict[str, float]:
    """Weighted kNN of the val images' class among the training images, pooled res5.

    Args:
        bank: training features, this process's shard or all of them (``index`` says which).
        queries: validation features of every record, in record order.
    """
    train_y = torch.as_tensor(class_labels(d.train))[bank["index"]]
    val_y = torch.as_tensor(class_labels(d.val))
    return knn_accuracy(
        bank["res5"].to(device),
        train_y.to(device),
        queries["res5"].to(device),
        val_y,
        len(d.classes),
        ks,
        temperature,
    )


def linear_metrics(
    train: Dict, val: Dict, d: ReadoutData, recipe: LinearRecipe
) -> Dict[str, float]:
    """Linear classification on cached pooled res5 (records in order): {"top1", "top5"}."""
    return linear_probe(
        train["res5"],
        torch.as_tensor(class_labels(d.train)),
        val["res5"],
        torch.as_tensor(class_labels(d.val)),
        len(d.classes),
        recipe,
    )


def cell_metrics(
    train: Dict, val: Dict, d: ReadoutData, grid: int, recipe: LinearRecipe
) -> Dict[str, float]:
    """InsLoc's linear localization ("Loc": which of the grid x grid cells a box feature is)
    and, when every record has its object's ``bbox``, which cell holds the object ("ObjLoc")."""
    m = grid * grid
    out = localization_probe(train["boxes"], val["boxes"], m, recipe)
    if all("bbox" in r for r in d.train + d.val):
        train_cells = object_cells(d.train, d.resize, d.crop, grid)
        val_cells = object_cells(d.val, d.resize, d.crop, grid)
        out.update(
            object_cell_probe(train["boxes"], train_cells, val["boxes"], val_cells, m, recipe)
        )
    return out


# ------------------------------------------------------------------------------------------
# The protocols: (encoder, settings, data, output folder) -> metrics in the main process, {}
# in the others
# ------------------------------------------------------------------------------------------
def _extract(encoder, s: ReadoutSettings, d: ReadoutData, split: str, **kwargs) -> Dict:
    records, name = (d.train, s.train) if split == "train" else (d.val, s.val)
    transform = eval_transform(d.resize, d.crop)
    return extract_features(
        encoder,
        records,
        transform,
        batch_size=s.batch_size,
        num_workers=s.num_workers,
        name=name,
        **kwargs,
    )


def _knn(encoder, s: ReadoutSettings, d: ReadoutData, output_dir: str) -> Dict:
    # The memory bank stays sharded over the processes; the queries are gathered.
    bank = _extract(encoder, s, d, "train", gather=False)
    queries = _extract(encoder, s, d, "val")
    # The similarities on the accelerator when there is one.
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
    train, val = _extract(encoder, s, d, "train"), _extract(encoder, s, d, "val")
    if not comm.is_main_process():
        return {}
    return linear_metrics(train, val, d, s.recipe)


def _loc(encoder, s: ReadoutSettings, d: ReadoutData, output_dir: str) -> Dict:
    boxes = grid_boxes(d.crop, d.crop, s.grid)
    # One backbone pass per image gives the cells' features and the whole image's (for Cls).
    train = _extract(encoder, s, d, "train", boxes=boxes)
    val = _extract(encoder, s, d, "val", boxes=boxes)
    if not comm.is_main_process():
        return {}
    out = cell_metrics(train, val, d, s.grid, s.recipe)
    if "label" in d.train[0]:
        out["Cls"] = linear_metrics(train, val, d, s.recipe)["top1"]
    return out


def _svm(encoder, s: ReadoutSettings, d: ReadoutData, output_dir: str) -> Dict:
    train = _extract(encoder, s, d, "train", stages=s.stages)
    val = _extract(encoder, s, d, "val", stages=s.stages)
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
