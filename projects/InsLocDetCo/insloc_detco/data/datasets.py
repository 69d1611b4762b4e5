"""Unlabeled image datasets for pretraining, registered in detectron2's ``DatasetCatalog``.

Each record is ``{"file_name": str, "image_id": int}``; labels, if the source has any, are
ignored. Sources:

* an ImageNet-style folder tree (``root/<class>/<image>``, any depth):
  :func:`register_image_folder`
* a text file with one image path per line (relative paths are taken from the file's folder
  or ``image_root``) — :func:`register_image_list`
* a COCO-format json: its ``images`` list — :func:`register_coco_images`
* ``pretrain_demo``: real photos shipped by scikit-image, so the default runs with no download.

Built-in names resolve paths under ``$DETECTRON2_DATASETS`` (default ``datasets/``), like
detectron2's own builtin datasets. A name of the form ``folder:PATH``, ``list:PATH`` or
``coco:JSON:IMAGE_ROOT`` is registered on first use, so a config can point at data directly;
other modules add forms of their own with :func:`register_on_first_use` (labelled class
folders, seeded subsets), and every name goes through :func:`try_register` /
:func:`ensure_registered`.
"""

import json
import logging
import os
import re
from collections import OrderedDict
from typing import Callable, Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.file_io import PathManager

__all__ = [
    "IMAGE_EXTENSIONS",
    "DEMO_PHOTOS",
    "register_image_folder",
    "register_image_list",
    "register_coco_images",
    "register_pretrain_demo",
    "register_on_first_use",
    "try_register",
    "ensure_registered",
    "skimage_data_dir",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")

# Real photographs among the files scikit-image ships under skimage/data (its synthetic
# images, drawings and the 14x25 gif are left out). Several are grayscale: the mapper converts.
DEMO_PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "cell.png",
    "chelsea.png",
    "clock_motion.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "microaneurysms.png",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "rocket.jpg",
)


def _records(file_names: List[str]) -> List[Dict]:
    return [{"file_name": f, "image_id": i} for i, f in enumerate(file_names)]


def _check_nonempty(files: List[str], name: str, source: str) -> List[str]:
    if not files:
        raise FileNotFoundError(f"Dataset '{name}': no images found in {source}.")
    logger.info(f"Dataset '{name}': {len(files)} images from {source}.")
    return files


def list_image_folder(root: str) -> List[str]:
    """
    All image files under ``root`` (recursively, following symbolic links), sorted for a
    deterministic order. Each real file is listed once: a folder reached again (a link loop
    such as ``sub/up -> ..``, or two links to one folder) is not walked again, a file reached
    through several links keeps its first path, and dangling links are left out; what is left
    out is counted in the log. Only folders and links are resolved, so that listing a large
    folder costs no extra system call per plain file.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"Image folder '{root}' does not exist. Set $DETECTRON2_DATASETS or fix the path."
        )
    files, seen = [], set()  # `seen`: resolved paths of the folders and files listed
    num_dirs, num_files, num_dangling = 0, 0, 0
    stack = [root]
    while stack:
        folder = stack.pop()
        real_folder = os.path.realpath(folder)
        if real_folder in seen:
            num_dirs += 1
            continue
        seen.add(real_folder)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            logger.warning(f"Folder {root}: cannot list {folder}, skipped: {e}")
            continue
        subfolders = []
        for e in entries:
            if e.is_dir():  # follows links
                subfolders.append(e.path)
            elif not e.name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            elif e.is_symlink() and not e.is_file():
                num_dangling += 1
            else:
                link = e.is_symlink()
                real = os.path.realpath(e.path) if link else os.path.join(real_folder, e.name)
                if real in seen:
                    num_files += 1
                else:
                    seen.add(real)
                    files.append(e.path)
        stack.extend(reversed(subfolders))  # depth first, in name order
    if num_dirs or num_files or num_dangling:
        logger.warning(
            f"Folder {root}: left out {num_files} image paths and {num_dirs} folders reached a "
            f"second time through symbolic links, and {num_dangling} dangling links. Each real "
            "file is listed once."
        )
    return files


def load_image_list(list_file: str, image_root: Optional[str] = None) -> List[str]:
    """Paths from a text file, one per line; blank lines and ``#`` comments are ignored."""
    image_root = image_root or os.path.dirname(os.path.abspath(list_file))
    with PathManager.open(list_file) as f:
        lines = [ln.strip() for ln in f]
    return [
        ln if os.path.isabs(ln) or "://" in ln else os.path.join(image_root, ln)
        for ln in lines
        if ln and not ln.startswith("#")
    ]


def load_coco_image_list(json_file: str, image_root: str) -> List[str]:
    """The ``images`` of a COCO json (annotations are ignored)."""
    with PathManager.open(json_file) as f:
        coco = json.load(f)
    if "images" not in coco:
        raise ValueError(f"'{json_file}' has no 'images' list: not a COCO-format json.")
    return [os.path.join(image_root, im["file_name"]) for im in coco["images"]]


def _register(name: str, list_fn, source: str, **metadata):
    DatasetCatalog.register(name, lambda: _records(_check_nonempty(list_fn(), name, source)))
    MetadataCatalog.get(name).set(evaluator_type="none", **metadata)


def register_image_folder(name: str, root: str):
    """Register every image under ``root`` (e.g. ImageNet's ``train/``) as dataset ``name``."""
    _register(name, lambda: list_image_folder(root), f"folder {root}", image_root=root)


def register_image_list(name: str, list_file: str, image_root: Optional[str] = None):
    """Register the images listed in ``list_file`` as dataset ``name``."""
    _register(name, lambda: load_image_list(list_file, image_root), f"list {list_file}")


def register_coco_images(name: str, json_file: str, image_root: str):
    """Register the images of a COCO json (labels ignored) as dataset ``name``."""
    _register(
        name,
        lambda: load_coco_image_list(json_file, image_root),
        f"COCO json {json_file}",
        json_file=json_file,
        image_root=image_root,
    )


def skimage_data_dir() -> str:
    """The folder of sample images that scikit-image ships."""
    try:
        import skimage
    except ImportError as e:
        raise ImportError(
            "The embedded demo data set needs scikit-image (pip install scikit-image)."
        ) from e
    return os.path.join(os.path.dirname(skimage.__file__), "data")


def register_pretrain_demo(name: str = "pretrain_demo"):
    """Real photos shipped by scikit-image: a pretraining set that needs no download."""

    def files():
        root = skimage_data_dir()
        return [os.path.join(root, f) for f in DEMO_PHOTOS if os.path.exists(os.path.join(root, f))]

    _register(name, files, "scikit-image's sample photos")


# form (as shown to users) -> (pattern, register); see register_on_first_use
_FIRST_USE: "OrderedDict[str, tuple]" = OrderedDict()


def register_on_first_use(form: str, pattern: str, register: Callable):
    """
    Let names that match ``pattern`` (a regular expression, matched whole) be registered when
    first used, by ``register(name, **named groups)``. It may return False to decline (e.g.
    the subset of a data set that is not registered); anything else means registered.
    ``form`` names the pattern in messages, e.g. "folder:PATH".
    """
    _FIRST_USE[form] = (re.compile(pattern), register)


def try_register(name: str) -> bool:
    """Whether ``name`` is registered, after registering it if it has a first-use form."""
    if name in DatasetCatalog.list():
        return True
    for pattern, register in _FIRST_USE.values():
        m = pattern.fullmatch(name)
        if m and register(name, **m.groupdict()) is not False:
            return True
    return False


def ensure_registered(name: str):
    """:func:`try_register`, or a KeyError naming what a data set name can be."""
    if not try_register(name):
        raise KeyError(
            f"Dataset '{name}' is not registered. Use a name registered in DatasetCatalog "
            "(e.g. pretrain_demo, imagenet_train, coco_train_2017_images) or one of "
            f"{', '.join(repr(form) for form in _FIRST_USE)}."
        )


register_on_first_use("folder:PATH", "folder:(?P<root>.+)", register_image_folder)
register_on_first_use("list:PATH", "list:(?P<list_file>.+)", register_image_list)
register_on_first_use(
    "coco:JSON:IMAGE_ROOT",
    "coco:(?P<json_file>[^:]+):(?P<image_root>[^:]+)",
    register_coco_images,
)


def _register_builtin(root: str):
    register_pretrain_demo("pretrain_demo")
    register_image_folder("imagenet_train", os.path.join(root, "imagenet", "train"))
    register_image_folder("imagenet_val", os.path.join(root, "imagenet", "val"))
    for split in ("train2017", "val2017"):
        register_coco_images(
            f"coco_{split[:-4]}_2017_images",
            os.path.join(root, "coco", "annotations", f"instances_{split}.json"),
            os.path.join(root, "coco", split),
        )
    register_coco_images(
        "coco_unlabeled_2017_images",
        os.path.join(root, "coco", "annotations", "image_info_unlabeled2017.json"),
        os.path.join(root, "coco", "unlabeled2017"),
    )


if "pretrain_demo" not in DatasetCatalog.list():
    _register_builtin(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))
