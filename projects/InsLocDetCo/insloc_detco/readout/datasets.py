"""
Labelled data sets for the readouts, in detectron2's ``DatasetCatalog``.

A readout data set is a list of records with ``file_name`` and either

* ``label``: one class index (classification: folder-per-class trees, ``demo_cls``), or
* ``annotations``: detectron2 instance dicts (detection sets such as ``voc_2007_trainval``):
  :func:`image_level_targets` turns them into VOC07 image-level labels (+1 / -1 / 0 = ignore),

and ``MetadataCatalog.get(name).thing_classes``. Registered names:

==========================================  ==============================================
``imagenet_cls_train``, ``imagenet_cls_val``  ``$DETECTRON2_DATASETS/imagenet/{train,val}/``
                                            ``<class>/*`` (folder per class)
``class_folder:PATH``                        any folder-per-class tree (registered on first
                                            use)
``demo_cls_train``, ``demo_cls_val``          the generated set (:mod:`.demo_cls`)
``voc_2007_trainval``, ``voc_2007_test``      detectron2's builtin VOC registration
==========================================  ==============================================

Classes of a folder tree are its sub-folders in sorted order (torchvision's ``ImageFolder``
convention), so that train and val of ImageNet get the same indices.
"""

import logging
import os
import xml.etree.ElementTree as ET
from typing import Dict, List, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog

from ..data.datasets import IMAGE_EXTENSIONS, register_on_first_use, try_register
from .encoder import ReadoutError

__all__ = [
    "register_class_folder",
    "get_readout_dataset",
    "class_labels",
    "image_level_targets",
]

logger = logging.getLogger(__name__)


def _list_class_folder(root: str) -> Tuple[List[str], List[Dict]]:
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"Class folder '{root}' does not exist. Set $DETECTRON2_DATASETS (ImageNet: "
            "imagenet/{train,val}/<class>/*.JPEG) or fix the path; to try the readouts without "
            "data, use the generated set: --train demo_cls_train --val demo_cls_val."
        )
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise FileNotFoundError(f"Class folder '{root}' has no class sub-folders.")
    records = []
    for label, cls in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls)):
            dirnames.sort()
            for f in sorted(filenames):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    records.append({"file_name": os.path.join(dirpath, f), "label": label})
    if not records:
        raise FileNotFoundError(f"Class folder '{root}' holds no images.")
    for i, r in enumerate(records):
        r["image_id"] = i
    return classes, records


def register_class_folder(name: str, root: str):
    """Register the folder-per-class tree ``root`` as the labelled data set ``name``."""

    def load():
        classes, records = _list_class_folder(root)
        meta = MetadataCatalog.get(name)
        if meta.get("thing_classes", None) is None:
            meta.set(thing_classes=classes)
        logger.info(f"Dataset '{name}': {len(records)} images of {len(classes)} classes ({root})")
        return records

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(dirname=root, evaluator_type="classification")


register_on_first_use("class_folder:PATH", "class_folder:(?P<root>.+)", register_class_folder)


def get_readout_dataset(name: str) -> Tuple[List[Dict], List[str]]:
    """
    Returns:
        (records, class names).
    Raises:
        ReadoutError: unknown name, missing or empty data, records without labels.
    """
    if not try_register(name):
        raise ReadoutError(
            f"Dataset '{name}' is not registered. Use imagenet_cls_train/val, voc_2007_trainval/"
            "test, demo_cls_train/val, any name registered in DatasetCatalog whose records have "
            "'label' or 'annotations', or 'class_folder:PATH'."
        )
    try:
        records = DatasetCatalog.get(name)
    except Exception as e:
        raise ReadoutError(f"Cannot load dataset '{name}': {type(e).__name__}: {e}") from e
    if not records:
        raise ReadoutError(f"Dataset '{name}' has no images.")
    if "label" not in records[0] and "annotations" not in records[0]:
        raise ReadoutError(
            f"Dataset '{name}' has no labels (records need 'label' or 'annotations'); "
            "unlabeled pretraining sets cannot be read out."
        )
    classes = MetadataCatalog.get(name).get("thing_classes", None)
    if not classes:
        raise ReadoutError(f"Dataset '{name}' has no thing_classes in its metadata.")
    return records, list(classes)


def class_labels(records: List[Dict], name: str = "") -> np.ndarray:
    """(N,) int64 class indices of single-label records."""
    if "label" not in records[0]:
        raise ReadoutError(
            f"Dataset '{name}' is multi-label (detection annotations): this readout needs one "
            "class per image; use the svm readout for multi-label sets."
        )
    return np.asarray([r["label"] for r in records], dtype=np.int64)


def _difficult_only(record: Dict, classes: List[str], dirname: str) -> set:
    """Classes with only 'difficult' objects in a VOC image (from its annotation XML)."""
    xml = os.path.join(dirname, "Annotations", f"{record['image_id']}.xml")
    if not os.path.isfile(xml):
        return set()
    easy, hard = set(), set()
    for obj in ET.parse(xml).findall("object"):
        d = obj.find("difficult")
        k = classes.index(obj.find("name").text)
        (hard if d is not None and int(d.text) == 1 else easy).add(k)
    return hard - easy


def image_level_targets(records: List[Dict], classes: List[str], name: str = "") -> np.ndarray:
    """
    (N, C) int8 image-level targets: +1 the class is present, -1 absent, 0 ignored.

    Single-label records: one-vs-rest (+1 for the label, -1 elsewhere). Detection records:
    +1 for every class with an object; as the VOC07 classification benchmark, a class whose
    only objects are marked 'difficult' in the VOC XML is ignored (0) for that image.
    """
    n, c = len(records), len(classes)
    targets = -np.ones((n, c), dtype=np.int8)
    if "label" in records[0]:
        targets[np.arange(n), class_labels(records, name)] = 1
        return targets
    dirname = MetadataCatalog.get(name).get("dirname", "") if name else ""
    for i, r in enumerate(records):
        for a in r.get("annotations", []):
            targets[i, a["category_id"]] = 1
        if dirname:
            for k in _difficult_only(r, classes, dirname):
                targets[i, k] = 0
    return targets


def _register_builtin(root: str):
    for split in ("train", "val"):
        register_class_folder(f"imagenet_cls_{split}", os.path.join(root, "imagenet", split))


if "imagenet_cls_train" not in DatasetCatalog.list():
    _register_builtin(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))
