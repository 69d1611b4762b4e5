"""demo_cityscapes: Cityscapes' layout, read by detectron2's loader, scored by its evaluator."""

import glob
import os

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances
from insloc_testing import registered_for_the_test
from PIL import Image
from pycocotools import mask as mask_utils

from insloc_detco.transfer import demo_cityscapes
from insloc_detco.transfer.evaluators import build_transfer_evaluator

pytestmark = pytest.mark.slow  # detectron2's loader starts a process pool; the evaluation


@pytest.fixture(scope="module")
def cityscapes(module_folder):
    root = str(module_folder("datasets") / "demo_cityscapes")
    demo_cityscapes.ensure_demo_cityscapes(root)
    demo_cityscapes.register_demo_cityscapes(root, prefix="t_demo_cityscapes")
    splits = demo_cityscapes.DEMO_CITYSCAPES_SPLITS
    with registered_for_the_test(f"t_demo_cityscapes_fine_instance_seg_{s}" for s in splits):
        yield root


def _gt_file(image_file: str, kind: str) -> str:
    return image_file.replace("leftImg8bit", "gtFine", 1).replace("leftImg8bit.png", kind)


def test_layout_and_the_loader_agree_with_the_pngs(cityscapes):
    """detectron2's loader (polygons) and cityscapesScripts' PNGs describe the same objects."""
    meta = MetadataCatalog.get("t_demo_cityscapes_fine_instance_seg_val")
    assert meta.evaluator_type == "cityscapes_instance" and len(meta.thing_classes) == 8
    for split, count in demo_cityscapes.DEMO_CITYSCAPES_SPLITS.items():
        images = glob.glob(os.path.join(cityscapes, "leftImg8bit", split, "*", "*.png"))
        assert len(images) == count
        for kind in ("gtFine_polygons.json", "gtFine_labelIds.png", "gtFine_instanceIds.png"):
            assert all(os.path.isfile(_gt_file(f, kind)) for f in images)
    labels = set(demo_cityscapes.DEMO_CITYSCAPES_LABELS.values())
    for r in DatasetCatalog.get("t_demo_cityscapes_fine_instance_seg_train"):
        ids = np.asarray(Image.open(_gt_file(r["file_name"], "gtFine_instanceIds.png")))
        assert ids.shape == (r["height"], r["width"]) == (128, 256)
        instances = [i for i in np.unique(ids) if i >= 1000]
        assert len(instances) == len(r["annotations"]) >= 1
        assert set(np.unique(ids)) - set(instances) <= {7}  # the rest is road
        for a in r["annotations"]:
            assert meta.thing_classes[a["category_id"]] in labels and not a["iscrowd"]
            rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], *ids.shape))
            mask = mask_utils.decode(rle).astype(bool)
            best = max(((ids == i) & mask).sum() / ((ids == i) | mask).sum() for i in instances)
            assert best > 0.8


def _predictions(record, drop_last: bool = False):
    """The ground truth of an image as a detector's output (one instance per instance id)."""
    meta = MetadataCatalog.get("t_demo_cityscapes_fine_instance_seg_val")
    ids = np.asarray(Image.open(_gt_file(record["file_name"], "gtFine_instanceIds.png")))
    instances = [i for i in np.unique(ids) if i >= 1000][: -1 if drop_last else None]
    from cityscapesscripts.helpers.labels import id2label

    out = Instances(ids.shape)
    masks = np.zeros((len(instances), *ids.shape), dtype=bool)
    for k, i in enumerate(instances):
        masks[k] = ids == i
    out.pred_masks = torch.as_tensor(masks)
    out.pred_boxes = Boxes(torch.zeros(len(instances), 4))
    out.scores = torch.ones(len(instances))
    classes = [meta.thing_classes.index(id2label[int(i) // 1000].name) for i in instances]
    out.pred_classes = torch.tensor(classes)
    return {"instances": out}


def test_cityscapes_evaluator_scores_the_ground_truth(cityscapes, tmp_path, monkeypatch):
    """CityscapesInstanceEvaluator (cityscapesScripts) gives the ground truth 100 AP and less
    to predictions missing an instance; it writes nothing in the current directory and leaves
    NumPy as it was."""
    monkeypatch.chdir(tmp_path)
    name = "t_demo_cityscapes_fine_instance_seg_val"
    records = DatasetCatalog.get(name)
    had_in1d = hasattr(np, "in1d")
    results = {}
    for drop in (False, True):
        ev = build_transfer_evaluator(get_cfg(), name, str(tmp_path / "inference"))
        ev.reset()
        for r in records:
            ev.process([r], [_predictions(r, drop_last=drop)])
        results[drop] = ev.evaluate()["segm"]
    assert results[False]["AP"] == pytest.approx(100.0)
    assert results[False]["AP50"] == pytest.approx(100.0)
    assert results[True]["AP50"] < 95.0
    assert os.listdir(tmp_path) == []  # no matches.json here
    assert hasattr(np, "in1d") == had_in1d
