"""
``demo_cityscapes``: a tiny generated set in Cityscapes' layout, so that the Cityscapes
instance-segmentation benchmark runs anywhere with no download, read by detectron2's own
Cityscapes loader (``load_cityscapes_instances``) and scored by its
``CityscapesInstanceEvaluator`` (cityscapesScripts' evaluation).

Images are drawn like ``demo_det``'s (a crop of a real photo with 1-3 pasted shapes) at
Cityscapes' 2:1 aspect. The shapes stand for three of Cityscapes' eight instance classes
(``DEMO_CITYSCAPES_LABELS``, our choice) and the rest of the image is labelled ``road``, a class
that counts in the evaluation (an "unlabeled" background would hide every false positive
there). The files are those of Cityscapes' fine annotations::

    $DETECTRON2_DATASETS/demo_cityscapes/
        leftImg8bit/{train,val}/<city>/<city>_000000_<frame>_leftImg8bit.png
        gtFine/{train,val}/<city>/<city>_000000_<frame>_gtFine_polygons.json
                                  <city>_000000_<frame>_gtFine_labelIds.png
                                  <city>_000000_<frame>_gtFine_instanceIds.png

The polygons (integer pixel coordinates, as Cityscapes') are the annotation; the two PNGs are
rendered from them by cityscapesScripts' own ``json2labelImg`` / ``json2instanceImg``, as
Cityscapes' were. Registered as ``demo_cityscapes_fine_instance_seg_{train,val}`` (evaluator
``cityscapes_instance``, the builtin Cityscapes metadata); generated on first load. Reading and
scoring need ``cityscapesscripts`` and ``shapely`` (``scripts/setup_env.sh`` installs them).
"""

import functools
import json
import os
from typing import Dict, List

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.cityscapes import load_cityscapes_instances
from PIL import Image

from .demo_det import _load_photos, _make_image, generate_once

__all__ = [
    "DEMO_CITYSCAPES_SPLITS",
    "DEMO_CITYSCAPES_LABELS",
    "demo_cityscapes_root",
    "ensure_demo_cityscapes",
    "register_demo_cityscapes",
]

DEMO_CITYSCAPES_SPLITS = {"train": 16, "val": 8}  # number of images
# demo_det's shapes -> Cityscapes instance classes (cityscapesscripts.helpers.labels names).
DEMO_CITYSCAPES_LABELS = {"circle": "person", "square": "car", "triangle": "bus"}
_BACKGROUND = "road"
_CITY = "shapetown"  # one city per split; Cityscapes' file names allow no "_" in it
_SIZE = (256, 128)  # (W, H): Cityscapes' 2048 x 1024, scaled down
_VERSION = "demo_cityscapes v1 seed 2022"
_STAMP = "COMPLETE"


def demo_cityscapes_root() -> str:
    """``$DETECTRON2_DATASETS/demo_cityscapes`` (default ``datasets/``)."""
    datasets = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    return os.path.abspath(os.path.join(datasets, "demo_cityscapes"))


def ensure_demo_cityscapes(root: str) -> str:
    """Generate the set under ``root`` unless a complete one of this version is there."""
    return generate_once(root, _is_complete, _generate)


def _is_complete(root: str) -> bool:
    stamp = os.path.join(root, _STAMP)
    return os.path.isfile(stamp) and open(stamp).read() == _VERSION


def _polygons_json(objects: List[Dict]) -> Dict:
    """Cityscapes' ``gtFine_polygons.json``: objects drawn in order, each over the earlier ones
    (the road first, covering the image)."""
    w, h = _SIZE
    road = {"label": _BACKGROUND, "polygon": [[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]]}
    shapes = [
        {
            "label": DEMO_CITYSCAPES_LABELS[o["class"]],
            "polygon": [[int(round(x)), int(round(y))] for x, y in o["polygon"]],
        }
        for o in objects
    ]
    return {"imgHeight": h, "imgWidth": w, "objects": [road] + shapes}


def _generate(root: str):
    """Write both splits under ``root`` (deterministic)."""
    try:
        from cityscapesscripts.helpers.annotation import Annotation
        from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
        from cityscapesscripts.preparation.json2labelImg import json2labelImg
    except ImportError as e:
        raise ImportError(
            f"demo_cityscapes is rendered with cityscapesScripts ({e}): pip install "
            "cityscapesscripts shapely (scripts/setup_env.sh installs them)."
        ) from e
    photos, rng = _load_photos(), np.random.default_rng(2022)
    frame = 0
    for split, count in DEMO_CITYSCAPES_SPLITS.items():
        image_dir = os.path.join(root, "leftImg8bit", split, _CITY)
        gt_dir = os.path.join(root, "gtFine", split, _CITY)
        os.makedirs(image_dir)
        os.makedirs(gt_dir)
        for _ in range(count):
            image, objects = _make_image(photos, rng, size=_SIZE)
            stem = f"{_CITY}_000000_{frame:06d}"
            frame += 1
            image.save(os.path.join(image_dir, f"{stem}_leftImg8bit.png"))
            polygons = os.path.join(gt_dir, f"{stem}_gtFine_polygons.json")
            with open(polygons, "w") as f:
                json.dump(_polygons_json(objects), f)
            gt = os.path.join(gt_dir, f"{stem}_gtFine_")
            json2labelImg(polygons, gt + "labelIds.png", "ids")
            # json2instanceImg saves a 32-bit image, which Pillow no longer writes as PNG; the
            # ids (class * 1000 + instance) fit 16 bits, as in Cityscapes' own files.
            annotation = Annotation()
            annotation.fromJsonFile(polygons)
            ids = np.asarray(createInstanceImage(annotation, "ids"), dtype=np.uint16)
            Image.fromarray(ids).save(gt + "instanceIds.png")
    with open(os.path.join(root, _STAMP), "w") as f:
        f.write(_VERSION)


def _load(root: str, split: str) -> List[Dict]:
    ensure_demo_cityscapes(root)
    return load_cityscapes_instances(
        os.path.join(root, "leftImg8bit", split),
        os.path.join(root, "gtFine", split),
        from_json=True,
        to_polygons=True,
    )


def register_demo_cityscapes(root: str = None, prefix: str = "demo_cityscapes"):
    """Register ``<prefix>_fine_instance_seg_{train,val}`` over the set at ``root``, with the
    metadata of detectron2's builtin ``cityscapes_fine_instance_seg_*`` sets."""
    root = root or demo_cityscapes_root()
    builtin = MetadataCatalog.get("cityscapes_fine_instance_seg_train")
    for split in DEMO_CITYSCAPES_SPLITS:
        name = f"{prefix}_fine_instance_seg_{split}"
        DatasetCatalog.register(name, functools.partial(_load, root, split))
        MetadataCatalog.get(name).set(
            thing_classes=list(builtin.thing_classes),
            stuff_classes=list(builtin.stuff_classes),
            image_dir=os.path.join(root, "leftImg8bit", split),
            gt_dir=os.path.join(root, "gtFine", split),
            evaluator_type="cityscapes_instance",
        )


if "demo_cityscapes_fine_instance_seg_train" not in DatasetCatalog.list():
    register_demo_cityscapes()
