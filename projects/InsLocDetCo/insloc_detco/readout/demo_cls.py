"""
``demo_cls``: a generated, labelled classification and localization set for the readouts, made
like ``demo_det`` (no download): a crop of one of scikit-image's real photos with **one** object
pasted on it, whose shape is the class. The object is filled with a tinted crop of another photo,
so colour and texture never give the class away; its size (1/3 to 2/3 of the image side) and
position are random, so a feature must find the object to name its shape.

Written once, deterministically from a seed, as an ImageNet-style folder-per-class tree (so the
readouts read it through the same code path as ImageNet) plus the object boxes::

    $DETECTRON2_DATASETS/demo_cls/
        train/<class>/000000.jpg ...      2,000 images (DEMO_CLS_SPLITS)
        val/<class>/002000.jpg ...        500 images
        annotations/{train,val}.json      [{"file_name", "label", "bbox" (XYXY pixels)}]

and registered as ``demo_cls_train`` / ``demo_cls_val``. Records: ``{"file_name", "image_id",
"label", "bbox", "width", "height"}``; metadata ``thing_classes`` and ``image_size`` (the side
of the square images, used by the readouts as their default input size).
"""

import json
import os
from typing import Dict, List, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image, ImageDraw

from ..transfer.demo_det import _load_photos, _random_crop, generate_once

__all__ = [
    "DEMO_CLS_CLASSES",
    "DEMO_CLS_SPLITS",
    "DEMO_CLS_SIZE",
    "demo_cls_root",
    "ensure_demo_cls",
    "load_demo_cls",
    "register_demo_cls",
]

# Sorted, so that the class index is also the folder's index in a sorted listing (the
# convention of folder-per-class loaders such as torchvision's ImageFolder).
DEMO_CLS_CLASSES = (
    "circle",
    "cross",
    "diamond",
    "hexagon",
    "ring",
    "square",
    "star",
    "triangle",
)
DEMO_CLS_SPLITS = {"train": 2000, "val": 500}
DEMO_CLS_SIZE = 96  # side of the square images, pixels
_OBJECT_SIDE = (1 / 3, 2 / 3)  # side of the object's square box, as a fraction of the image
_SEED = 2024
_STAMP = "COMPLETE"


def _version(splits: Dict[str, int], size: int) -> str:
    # Bump "v1" when the generator changes: a folder with another stamp is rewritten.
    return f"demo_cls v1 seed {_SEED} size {size} {sorted(splits.items())}"


def demo_cls_root() -> str:
    """Where the set lives: ``$DETECTRON2_DATASETS/demo_cls`` (default ``datasets/``)."""
    return os.path.abspath(
        os.path.join(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "demo_cls")
    )


def _is_complete(root: str, version: str) -> bool:
    stamp = os.path.join(root, _STAMP)
    return os.path.isfile(stamp) and open(stamp).read() == version


def ensure_demo_cls(
    root: str, splits: Dict[str, int] = DEMO_CLS_SPLITS, size: int = DEMO_CLS_SIZE
) -> str:
    """
    Generate the set under ``root`` unless a complete one of this version is there.

    Args:
        splits: split name -> number of images (tests use a few dozen).
        size: side of the square images.
    """
    version = _version(splits, size)
    return generate_once(
        root, lambda r: _is_complete(r, version), lambda tmp: _generate(tmp, splits, size, version)
    )


# ------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------
def _regular_polygon(cx: float, cy: float, r: float, n: int, phase: float) -> List[Tuple]:
    angles = phase + np.arange(n) * 2 * np.pi / n
    return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles]


def _draw_shape(draw: ImageDraw.ImageDraw, cls: str, x0: float, y0: float, s: float):
    """Fill (255) the class's shape inscribed in the square box (x0, y0, s, s) of a mask."""
    cx, cy, r = x0 + s / 2, y0 + s / 2, s / 2
    box = (x0, y0, x0 + s, y0 + s)
    if cls == "circle":
        draw.ellipse(box, fill=255)
    elif cls == "ring":  # a circle with a hole: the interior tells it from "circle"
        draw.ellipse(box, fill=255)
        draw.ellipse((cx - 0.5 * r, cy - 0.5 * r, cx + 0.5 * r, cy + 0.5 * r), fill=0)
    elif cls == "square":
        draw.rectangle(box, fill=255)
    elif cls == "diamond":
        draw.polygon(_regular_polygon(cx, cy, r, 4, 0.0), fill=255)
    elif cls == "hexagon":
        draw.polygon(_regular_polygon(cx, cy, r, 6, 0.0), fill=255)
    elif cls == "triangle":
        draw.polygon([(cx, y0), (x0 + s, y0 + s), (x0, y0 + s)], fill=255)
    elif cls == "cross":
        t = s / 6  # half the bar width
        draw.rectangle((cx - t, y0, cx + t, y0 + s), fill=255)
        draw.rectangle((x0, cy - t, x0 + s, cy + t), fill=255)
    elif cls == "star":
        outer = _regular_polygon(cx, cy, r, 5, -np.pi / 2)
        inner = _regular_polygon(cx, cy, 0.45 * r, 5, -np.pi / 2 + np.pi / 5)
        draw.polygon([p for pair in zip(outer, inner) for p in pair], fill=255)
    else:
        raise ValueError(cls)


def _make_image(
    photos: List[Image.Image], label: int, side: int, rng
) -> Tuple[Image.Image, List[int]]:
    """One ``side`` x ``side`` image of class ``label`` and the XYXY pixel box of its object."""
    size = (side, side)
    bg_index = int(rng.integers(len(photos)))
    image = _random_crop(photos[bg_index], size, rng)
    s = int(round(rng.uniform(*_OBJECT_SIDE) * side))
    x0, y0 = int(rng.integers(0, side - s + 1)), int(rng.integers(0, side - s + 1))
    mask = Image.new("L", size, 0)
    _draw_shape(ImageDraw.Draw(mask), DEMO_CLS_CLASSES[label], x0, y0, s)
    # Texture from another photo, tinted so that colour alone never gives the class away.
    other = (bg_index + 1 + int(rng.integers(len(photos) - 1))) % len(photos)
    texture = np.asarray(_random_crop(photos[other], size, rng), dtype=np.float32)
    tint = rng.uniform(0, 255, size=3).astype(np.float32)
    image.paste(Image.fromarray((0.5 * texture + 0.5 * tint).astype(np.uint8)), (0, 0), mask)
    return image, [x0, y0, x0 + s, y0 + s]


def _generate(root: str, splits: Dict[str, int], size: int, version: str):
    """Write the whole set under ``root`` (deterministic: one generator, fixed order)."""
    photos = _load_photos()
    rng = np.random.default_rng(_SEED)
    os.makedirs(os.path.join(root, "annotations"))
    image_id = 0
    for split, count in splits.items():
        for cls in DEMO_CLS_CLASSES:
            os.makedirs(os.path.join(root, split, cls))
        # Balanced classes in a random order.
        labels = rng.permutation(np.arange(count) % len(DEMO_CLS_CLASSES))
        records = []
        for label in labels:
            image, box = _make_image(photos, int(label), size, rng)
            rel = os.path.join(split, DEMO_CLS_CLASSES[label], f"{image_id:06d}.jpg")
            image.save(os.path.join(root, rel), quality=95)
            records.append({"file_name": rel, "label": int(label), "bbox": box, "size": size})
            image_id += 1
        with open(os.path.join(root, "annotations", f"{split}.json"), "w") as f:
            json.dump(records, f)
    with open(os.path.join(root, _STAMP), "w") as f:
        f.write(version)


# ------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------
def load_demo_cls(
    root: str, split: str, splits: Dict[str, int] = DEMO_CLS_SPLITS, size: int = DEMO_CLS_SIZE
) -> List[Dict]:
    """The records of one split (the set is generated first if needed)."""
    ensure_demo_cls(root, splits, size)
    with open(os.path.join(root, "annotations", f"{split}.json")) as f:
        records = json.load(f)
    return [
        {
            "file_name": os.path.join(root, r["file_name"]),
            "image_id": i,
            "label": r["label"],
            "bbox": r["bbox"],
            "width": r["size"],
            "height": r["size"],
        }
        for i, r in enumerate(records)
    ]


def register_demo_cls(
    root: str = None,
    prefix: str = "demo_cls",
    splits: Dict[str, int] = DEMO_CLS_SPLITS,
    size: int = DEMO_CLS_SIZE,
):
    """Register ``<prefix>_<split>`` over the set at ``root`` (generated on first load)."""
    root = root or demo_cls_root()
    for split in splits:
        name = f"{prefix}_{split}"
        DatasetCatalog.register(name, lambda s=split: load_demo_cls(root, s, splits, size))
        MetadataCatalog.get(name).set(
            thing_classes=list(DEMO_CLS_CLASSES),
            image_size=size,
            dirname=root,
            split=split,
            evaluator_type="classification",
        )


if "demo_cls_train" not in DatasetCatalog.list():
    register_demo_cls()
