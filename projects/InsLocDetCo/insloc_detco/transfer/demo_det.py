"""
``demo_det``: a tiny generated detection data set, so that the transfer path (conversion,
fine-tuning, VOC and COCO evaluation) runs anywhere with no download.

Each image is a crop of one of scikit-image's real photos (the ``pretrain_demo`` photos) with 1-3
non-overlapping objects pasted on it: a circle, square or triangle (the class) filled with a
tinted crop of another photo. Every object has an exact box and instance mask, and the corners
of squares and triangles are its keypoints (``DEMO_DET_KEYPOINT_NAMES``: a square's four, a
triangle's apex and base corners; a circle has none), so that Keypoint R-CNN trains and COCO's
keypoint AP is computed on it too. The set is written once, deterministically, side by side::

    $DETECTRON2_DATASETS/demo_det/
        JPEGImages/000000.jpg ...                  shared by both formats
        Annotations/000000.xml ...                 VOC boxes
        ImageSets/Main/{train,val}.txt             VOC splits
        SegmentationObject/, SegmentationClass/    VOC instance / class masks (PNG, palette)
        annotations/instances_{train,val}.json     COCO boxes + polygon masks
        annotations/keypoints_{train,val}.json     the same + COCO keypoints (x, y, v)

and registered as ``demo_det_voc_{train,val}`` (evaluator ``pascal_voc``),
``demo_det_coco_{train,val}`` and ``demo_det_keypoints_{train,val}`` (evaluator ``coco``; the
latter with ``keypoint_names`` and ``keypoint_flip_map``). Generation happens on first load.
"""

import functools
import json
import os
import shutil
import xml.etree.ElementTree as ET
from typing import Callable, Dict, List, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.data.datasets.pascal_voc import load_voc_instances
from PIL import Image, ImageDraw

from ..data.datasets import DEMO_PHOTOS, skimage_data_dir
from ..data.reading import read_rgb_image

__all__ = [
    "DEMO_DET_CLASSES",
    "DEMO_DET_SPLITS",
    "DEMO_DET_FORMATS",
    "DEMO_DET_KEYPOINT_NAMES",
    "DEMO_DET_KEYPOINT_FLIP_MAP",
    "DEMO_DET_KEYPOINT_OKS_SIGMAS",
    "demo_det_root",
    "ensure_demo_det",
    "register_demo_det",
    "write_unlabeled_images",
]

DEMO_DET_CLASSES = ("circle", "square", "triangle")
DEMO_DET_SPLITS = {"train": 32, "val": 8}  # number of images
DEMO_DET_FORMATS = ("voc", "coco", "keypoints")  # registered as demo_det_<format>_<split>
# Keypoints: the corners of the shapes. Mirroring swaps left and right; the apex stays the apex.
DEMO_DET_KEYPOINT_NAMES = ("top_left", "top", "top_right", "bottom_right", "bottom_left")
DEMO_DET_KEYPOINT_FLIP_MAP = (("top_left", "top_right"), ("bottom_left", "bottom_right"))
# Each shape's corners in the order of its polygon's vertices (``_shape_polygon``).
_CORNERS = {
    "square": ("top_left", "top_right", "bottom_right", "bottom_left"),
    "triangle": ("top", "bottom_right", "bottom_left"),
    "circle": (),
}
# OKS sigma per keypoint (choice): COCO's person sigmas span 0.025 (eyes) to 0.107 (hips); a
# corner is about as sharp as a wrist (0.062). The demo keypoint configs repeat these values
# (TEST.KEYPOINT_OKS_SIGMAS).
DEMO_DET_KEYPOINT_OKS_SIGMAS = (0.06, 0.06, 0.06, 0.06, 0.06)
# Bump when the generator changes: an existing folder with another stamp is rewritten.
_VERSION = "demo_det v2 seed 2021"
_STAMP = "COMPLETE"
_SIZES = ((160, 128), (128, 160), (144, 144))  # (W, H) of the images
_OBJECT_SIZE = (28, 64)  # side of an object's square box, pixels
_MAX_OBJECTS = 3


def demo_det_root() -> str:
    """Where the set lives: ``$DETECTRON2_DATASETS/demo_det`` (default ``datasets/``)."""
    return os.path.abspath(
        os.path.join(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "demo_det")
    )


def ensure_demo_det(root: str) -> str:
    """Generate the set under ``root`` unless a complete one of this version is there."""
    return generate_once(root, _is_complete, _generate)


def generate_once(
    root: str, is_complete: Callable[[str], bool], generate: Callable[[str], None]
) -> str:
    """
    Make a generated data set appear at ``root`` whole or not at all: ``generate(tmp)`` writes
    a private folder that is then renamed to ``root``, unless ``is_complete(root)`` already.
    Processes racing to generate the same set are safe (their copies are identical).
    """
    if is_complete(root):
        return root
    tmp = f"{root}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    generate(tmp)
    if os.path.isdir(root) and not is_complete(root):
        shutil.rmtree(root, ignore_errors=True)  # an old version or an interrupted write
    try:
        os.rename(tmp, root)
    except OSError:  # another process finished first: its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _is_complete(root: str) -> bool:
    stamp = os.path.join(root, _STAMP)
    return os.path.isfile(stamp) and open(stamp).read() == _VERSION


# ------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------
def _shape_polygon(cls: str, x0: float, y0: float, s: float) -> List[Tuple[float, float]]:
    """Vertices of a class's shape inscribed in the square box (x0, y0, s, s)."""
    if cls == "square":
        return [(x0, y0), (x0 + s, y0), (x0 + s, y0 + s), (x0, y0 + s)]
    if cls == "triangle":
        return [(x0 + s / 2, y0), (x0 + s, y0 + s), (x0, y0 + s)]
    angles = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    r = s / 2
    return [(x0 + r + r * np.cos(a), y0 + r + r * np.sin(a)) for a in angles]


def _random_crop(photo: Image.Image, size: Tuple[int, int], rng) -> Image.Image:
    """A random crop of ``photo`` with the aspect of ``size`` (W, H), resized to it."""
    w, h = photo.size
    scale = rng.uniform(0.3, 1.0) * min(w / size[0], h / size[1])
    cw, ch = max(1, int(size[0] * scale)), max(1, int(size[1] * scale))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return photo.crop((x, y, x + cw, y + ch)).resize(size, Image.BILINEAR)


def _make_image(
    photos: List[Image.Image], rng, size: Tuple[int, int] = None
) -> Tuple[Image.Image, List[Dict]]:
    """
    One composite image and its objects: dicts with class, polygon, mask (H, W) bool.
    ``size`` (W, H): drawn from ``_SIZES`` if None.
    """
    size = size or _SIZES[int(rng.integers(len(_SIZES)))]
    bg_index = int(rng.integers(len(photos)))
    image = _random_crop(photos[bg_index], size, rng)
    objects, boxes = [], []
    for _ in range(int(rng.integers(1, _MAX_OBJECTS + 1))):
        for _attempt in range(20):
            s = int(rng.integers(_OBJECT_SIZE[0], _OBJECT_SIZE[1] + 1))
            x0, y0 = int(rng.integers(0, size[0] - s)), int(rng.integers(0, size[1] - s))
            box = (x0 - 2, y0 - 2, x0 + s + 2, y0 + s + 2)  # 2 px apart: masks never touch
            if all(
                box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in boxes
            ):
                break
        else:
            continue  # no room left
        cls = DEMO_DET_CLASSES[int(rng.integers(len(DEMO_DET_CLASSES)))]
        polygon = [(round(x, 1), round(y, 1)) for x, y in _shape_polygon(cls, x0, y0, s)]
        mask_img = Image.new("L", size, 0)
        ImageDraw.Draw(mask_img).polygon(polygon, fill=255)
        # Texture from another photo, tinted so that colour alone never gives the class away.
        other = (bg_index + 1 + int(rng.integers(len(photos) - 1))) % len(photos)
        texture = np.asarray(_random_crop(photos[other], size, rng), dtype=np.float32)
        tint = rng.uniform(0, 255, size=3).astype(np.float32)
        fill = Image.fromarray((0.5 * texture + 0.5 * tint).astype(np.uint8))
        image.paste(fill, (0, 0), mask_img)
        objects.append({"class": cls, "polygon": polygon, "mask": np.asarray(mask_img) > 0})
        boxes.append(box)
    return image, objects


def _mask_box(mask: np.ndarray) -> Tuple[int, int, int, int]:
    """Tight box of a mask as pixel indices (x0, y0, x1, y1), inclusive."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def _coco_keypoints(obj: Dict) -> List[float]:
    """
    COCO ``keypoints`` of an object: (x, y, v) per name of ``DEMO_DET_KEYPOINT_NAMES``, v = 2
    (labelled, visible) at the shape's corners and 0 elsewhere. A vertex is given as the index
    of its pixel, as COCO does (ImageDraw fills the pixel a vertex names; detectron2 adds 0.5
    when it loads the file and subtracts it again when it writes predictions).
    """
    corners = dict(zip(_CORNERS[obj["class"]], obj["polygon"]))
    out: List[float] = []
    for name in DEMO_DET_KEYPOINT_NAMES:
        x, y = corners.get(name, (0.0, 0.0))
        out += [float(x), float(y), 2 if name in corners else 0]
    return out


def _voc_xml(file_id: str, size: Tuple[int, int], objects: List[Dict]) -> ET.ElementTree:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "demo_det"
    ET.SubElement(root, "filename").text = f"{file_id}.jpg"
    s = ET.SubElement(root, "size")
    for tag, value in (("width", size[0]), ("height", size[1]), ("depth", 3)):
        ET.SubElement(s, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "1"
    for obj in objects:
        o = ET.SubElement(root, "object")
        ET.SubElement(o, "name").text = obj["class"]
        ET.SubElement(o, "pose").text = "Unspecified"
        ET.SubElement(o, "truncated").text = "0"
        ET.SubElement(o, "difficult").text = "0"
        b = ET.SubElement(o, "bndbox")
        x0, y0, x1, y1 = _mask_box(obj["mask"])
        # VOC boxes are 1-based inclusive pixel indices.
        for tag, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1 + 1), ("ymax", y1 + 1)):
            ET.SubElement(b, tag).text = str(value)
    return ET.ElementTree(root)


def _palette_png(labels: np.ndarray) -> Image.Image:
    png = Image.fromarray(labels.astype(np.uint8), mode="P")
    palette = np.random.default_rng(0).integers(0, 256, size=(256, 3)).astype(np.uint8)
    palette[0] = 0
    png.putpalette(palette.flatten().tolist())
    return png


def _load_photos() -> List[Image.Image]:
    photo_dir = skimage_data_dir()
    photos = [
        Image.fromarray(read_rgb_image(os.path.join(photo_dir, f)).permute(1, 2, 0).numpy())
        for f in DEMO_PHOTOS
        if os.path.exists(os.path.join(photo_dir, f))
    ]
    if len(photos) < 2:
        raise FileNotFoundError(f"demo_det needs scikit-image's sample photos in {photo_dir}.")
    return photos


def write_unlabeled_images(root: str, count: int, seed: int = 7) -> List[str]:
    """
    Write ``count`` more images drawn like demo_det's (another seed, no annotations) under
    ``root``: an unlabeled pretraining pool from the task's domain, as COCO's unlabeled2017 is
    for COCO. Returns their paths; existing files are reused.
    """
    os.makedirs(root, exist_ok=True)
    paths = [os.path.join(root, f"unlabeled_{seed}_{i:06d}.jpg") for i in range(count)]
    if all(os.path.isfile(p) for p in paths):
        return paths
    photos, rng = _load_photos(), np.random.default_rng(seed)
    for path in paths:
        image, _ = _make_image(photos, rng)
        image.save(path, quality=95)
    return paths


def _write_voc_files(root: str, file_id: str, image: Image.Image, objects: List[Dict]):
    """The image, its VOC boxes and its instance / class PNGs."""
    image.save(os.path.join(root, "JPEGImages", f"{file_id}.jpg"), quality=95)
    _voc_xml(file_id, image.size, objects).write(
        os.path.join(root, "Annotations", f"{file_id}.xml")
    )
    instance_map = np.zeros(image.size[::-1], dtype=np.uint8)
    class_map = np.zeros_like(instance_map)
    for k, obj in enumerate(objects):
        instance_map[obj["mask"]] = k + 1
        class_map[obj["mask"]] = DEMO_DET_CLASSES.index(obj["class"]) + 1
    _palette_png(instance_map).save(os.path.join(root, "SegmentationObject", f"{file_id}.png"))
    _palette_png(class_map).save(os.path.join(root, "SegmentationClass", f"{file_id}.png"))


def _coco_annotation(ann_id: int, image_id: int, obj: Dict) -> Dict:
    x0, y0, x1, y1 = _mask_box(obj["mask"])
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": DEMO_DET_CLASSES.index(obj["class"]) + 1,
        "bbox": [x0, y0, x1 + 1 - x0, y1 + 1 - y0],
        "area": int(obj["mask"].sum()),
        "iscrowd": 0,
        "segmentation": [[float(v) for xy in obj["polygon"] for v in xy]],
    }


def _with_keypoints(coco: Dict, objects: List[Dict]) -> Dict:
    """A COCO instances dict + keypoints: per annotation ``keypoints`` and ``num_keypoints``,
    per category the keypoint names (the same for all three) and the outline as skeleton."""
    n = len(DEMO_DET_KEYPOINT_NAMES)
    skeleton = [[i + 1, (i + 1) % n + 1] for i in range(n)]
    categories = [
        {**c, "keypoints": list(DEMO_DET_KEYPOINT_NAMES), "skeleton": skeleton}
        for c in coco["categories"]
    ]
    annotations = []
    for ann, obj in zip(coco["annotations"], objects):
        count = len(_CORNERS[obj["class"]])
        annotations.append({**ann, "keypoints": _coco_keypoints(obj), "num_keypoints": count})
    return {**coco, "annotations": annotations, "categories": categories}


def _generate(root: str):
    """Write the whole set under ``root`` (deterministic)."""
    photos = _load_photos()
    for sub in (
        "JPEGImages",
        "Annotations",
        "ImageSets/Main",
        "SegmentationObject",
        "SegmentationClass",
        "annotations",
    ):
        os.makedirs(os.path.join(root, sub))
    rng = np.random.default_rng(2021)
    categories = [
        {"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(DEMO_DET_CLASSES)
    ]
    # Ids start at 1: pycocotools marks matches with the ground truth's id, so id 0 would
    # count as unmatched.
    image_id, ann_id = 1, 1
    for split, count in DEMO_DET_SPLITS.items():
        coco = {"images": [], "annotations": [], "categories": categories}
        ids, split_objects = [], []
        for _ in range(count):
            image, objects = _make_image(photos, rng)
            file_id = f"{image_id:06d}"
            ids.append(file_id)
            _write_voc_files(root, file_id, image, objects)
            coco["images"].append(
                {
                    "id": image_id,
                    "file_name": f"{file_id}.jpg",
                    "width": image.size[0],
                    "height": image.size[1],
                }
            )
            for obj in objects:
                coco["annotations"].append(_coco_annotation(ann_id, image_id, obj))
                ann_id += 1
            split_objects += objects
            image_id += 1
        with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
        with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(coco, f)
        with open(os.path.join(root, "annotations", f"keypoints_{split}.json"), "w") as f:
            json.dump(_with_keypoints(coco, split_objects), f)
    with open(os.path.join(root, _STAMP), "w") as f:
        f.write(_VERSION)


# ------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------
def _load_coco(root: str, json_file: str, name: str) -> List[Dict]:
    ensure_demo_det(root)
    return load_coco_json(json_file, os.path.join(root, "JPEGImages"), name)


def register_demo_det(root: str = None, prefix: str = "demo_det"):
    """Register ``<prefix>_{voc,coco,keypoints}_{train,val}`` over the set at ``root``
    (generated lazily)."""
    root = root or demo_det_root()
    image_root = os.path.join(root, "JPEGImages")
    for split in DEMO_DET_SPLITS:
        voc = f"{prefix}_voc_{split}"
        DatasetCatalog.register(
            voc, lambda s=split: load_voc_instances(ensure_demo_det(root), s, DEMO_DET_CLASSES)
        )
        MetadataCatalog.get(voc).set(
            thing_classes=list(DEMO_DET_CLASSES),
            dirname=root,
            split=split,
            year=2012,  # VOC2012 AP (area under the curve), not the 11-point VOC07 metric
            evaluator_type="pascal_voc",
        )
        for fmt, json_name, extra in (
            ("coco", f"instances_{split}.json", {}),
            (
                "keypoints",
                f"keypoints_{split}.json",
                {
                    "keypoint_names": list(DEMO_DET_KEYPOINT_NAMES),
                    "keypoint_flip_map": list(DEMO_DET_KEYPOINT_FLIP_MAP),
                },
            ),
        ):
            name = f"{prefix}_{fmt}_{split}"
            json_file = os.path.join(root, "annotations", json_name)
            DatasetCatalog.register(name, functools.partial(_load_coco, root, json_file, name))
            MetadataCatalog.get(name).set(
                thing_classes=list(DEMO_DET_CLASSES),
                json_file=json_file,
                image_root=image_root,
                evaluator_type="coco",
                **extra,
            )


if "demo_det_voc_train" not in DatasetCatalog.list():
    register_demo_det()
