"""demo_det (generated VOC + COCO detection set) and the seeded data subsets."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.structures import Boxes, BoxMode, Instances
from insloc_testing import registered_for_the_test
from PIL import Image
from pycocotools import mask as mask_utils

from insloc_detco.data.datasets import try_register
from insloc_detco.transfer import demo_det
from insloc_detco.transfer.subsets import register_subset, subset_image_ids


@pytest.fixture(scope="module")
def demo_root(module_folder):
    root = str(module_folder("datasets") / "demo_det")
    demo_det.ensure_demo_det(root)
    demo_det.register_demo_det(root, prefix="t_demo_det")
    splits, formats = demo_det.DEMO_DET_SPLITS, demo_det.DEMO_DET_FORMATS
    names = [f"t_demo_det_{f}_{s}" for s in splits for f in formats]
    with registered_for_the_test(names):
        yield root


def _polygon_mask(polygons, h, w):
    """(H, W) uint8 mask of COCO polygons, rasterised by pycocotools as COCOeval does."""
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, h, w)))


def _digest(root):
    h = hashlib.sha256()
    for dirpath, dirnames, files in sorted(os.walk(root)):
        dirnames.sort()
        for f in sorted(files):
            h.update(f.encode())
            with open(os.path.join(dirpath, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def test_generation_is_deterministic_and_cached(demo_root, tmp_path):
    other = str(tmp_path / "demo_det")
    demo_det.ensure_demo_det(other)
    assert _digest(other) == _digest(demo_root)
    stamp = os.path.join(other, "COMPLETE")
    before = os.path.getmtime(stamp)
    demo_det.ensure_demo_det(other)  # complete: not rewritten
    assert os.path.getmtime(stamp) == before


def test_voc_and_coco_describe_the_same_objects(demo_root):
    for split, count in demo_det.DEMO_DET_SPLITS.items():
        voc = DatasetCatalog.get(f"t_demo_det_voc_{split}")
        coco = DatasetCatalog.get(f"t_demo_det_coco_{split}")
        assert len(voc) == len(coco) == count
        for v, c in zip(voc, coco):
            assert os.path.basename(v["file_name"]) == os.path.basename(c["file_name"])
            w, h = Image.open(v["file_name"]).size
            assert (v["width"], v["height"]) == (c["width"], c["height"]) == (w, h)
            assert 1 <= len(v["annotations"]) == len(c["annotations"]) <= 3
            inst = np.asarray(
                Image.open(
                    v["file_name"]
                    .replace("JPEGImages", "SegmentationObject")
                    .replace(".jpg", ".png")
                )
            )
            for k, (va, ca) in enumerate(zip(v["annotations"], c["annotations"])):
                assert va["category_id"] == ca["category_id"]
                box = BoxMode.convert(ca["bbox"], ca["bbox_mode"], BoxMode.XYXY_ABS)
                np.testing.assert_allclose(va["bbox"], box)  # VOC 1-based inclusive, converted
                assert 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h
                # The COCO polygon and the VOC instance PNG are the same object.
                poly = _polygon_mask(ca["segmentation"], h, w).astype(bool)
                png = inst == k + 1
                iou = (poly & png).sum() / (poly | png).sum()
                assert iou > 0.8, (v["file_name"], k, iou)
                ys, xs = np.nonzero(png)
                assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == list(box)
            # Objects never overlap: every pasted object is fully visible.
            boxes = [
                BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                for a in c["annotations"]
            ]
            for i in range(len(boxes)):
                for j in range(i):
                    a, b = boxes[i], boxes[j]
                    assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_metadata_and_builtin_names(demo_root):
    assert MetadataCatalog.get("t_demo_det_voc_val").evaluator_type == "pascal_voc"
    assert MetadataCatalog.get("t_demo_det_coco_val").evaluator_type == "coco"
    for name in (
        "demo_det_voc_train",
        "demo_det_voc_val",
        "demo_det_coco_train",
        "demo_det_coco_val",
        "demo_det_coco_train_50pct",
    ):
        assert name in DatasetCatalog.list()
        assert list(MetadataCatalog.get(name).thing_classes) == list(demo_det.DEMO_DET_CLASSES)


def _as_predictions(record, with_masks):
    anns = record["annotations"]
    inst = Instances((record["height"], record["width"]))
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.scores = torch.ones(len(anns))
    inst.pred_classes = torch.tensor([a["category_id"] for a in anns])
    if with_masks:
        h, w = record["height"], record["width"]
        masks = [_polygon_mask(a["segmentation"], h, w) for a in anns]
        inst.pred_masks = torch.as_tensor(np.stack(masks)).bool()
    return {"instances": inst}


def test_evaluators_score_the_ground_truth_perfectly(demo_root, tmp_path):
    """Both formats are read correctly by detectron2's VOC and COCO evaluators."""
    voc = DatasetCatalog.get("t_demo_det_voc_val")
    ev = PascalVOCDetectionEvaluator("t_demo_det_voc_val")
    ev.reset()
    for r in voc:
        ev.process([r], [_as_predictions(r, with_masks=False)])
    res = ev.evaluate()["bbox"]
    assert res["AP50"] == pytest.approx(100.0) and res["AP"] == pytest.approx(100.0)

    coco = DatasetCatalog.get("t_demo_det_coco_val")
    ev = COCOEvaluator("t_demo_det_coco_val", tasks=("bbox", "segm"), output_dir=str(tmp_path))
    ev.reset()
    for r in coco:
        ev.process([r], [_as_predictions(r, with_masks=True)])
    res = ev.evaluate()
    assert res["bbox"]["AP"] == pytest.approx(100.0)
    assert res["segm"]["AP"] > 95.0  # polygons rasterised by pycocotools vs our masks


def _keypoints(annotation) -> np.ndarray:
    return np.asarray(annotation["keypoints"], dtype=np.float64).reshape(-1, 3)


def test_keypoints_are_the_corners_of_the_shapes(demo_root):
    """Squares have four visible keypoints, triangles three, circles none; each lies on its
    object's pixels and is named by where the corner is."""
    names = list(MetadataCatalog.get("t_demo_det_keypoints_train").keypoint_names)
    assert names == list(demo_det.DEMO_DET_KEYPOINT_NAMES)
    seen = set()
    for r in DatasetCatalog.get("t_demo_det_keypoints_train"):
        inst = np.asarray(
            Image.open(
                r["file_name"].replace("JPEGImages", "SegmentationObject").replace(".jpg", ".png")
            )
        )
        for k, a in enumerate(r["annotations"]):
            cls = demo_det.DEMO_DET_CLASSES[a["category_id"]]
            kp = _keypoints(a)
            seen.add(cls)
            assert (kp[:, 2] > 0).sum() == {"circle": 0, "square": 4, "triangle": 3}[cls]
            at = {n: kp[i, :2] for i, n in enumerate(names) if kp[i, 2] > 0}
            for x, y in at.values():  # detectron2 loads the corner's pixel centre
                px, py = max(int(x), 1), max(int(y), 1)
                assert (inst[py - 1 : py + 2, px - 1 : px + 2] == k + 1).any(), (r["file_name"], k)
            x0, y0, w, h = a["bbox"]
            if cls == "square":
                np.testing.assert_allclose(at["top_left"], (x0 + 0.5, y0 + 0.5), atol=1)
                np.testing.assert_allclose(at["bottom_right"], (x0 + w - 0.5, y0 + h - 0.5), atol=1)
                assert at["top_right"][0] > at["top_left"][0] and at["bottom_left"][1] > y0 + 1
            if cls == "triangle":
                assert at["bottom_left"][0] < at["top"][0] < at["bottom_right"][0]
                assert at["top"][1] < at["bottom_left"][1] - 10
    assert seen == set(demo_det.DEMO_DET_CLASSES)


def test_flipped_keypoints_keep_their_names(demo_root):
    """The flip map makes a mirrored square's top-left keypoint its new top-left corner."""
    from detectron2.data import detection_utils as utils
    from detectron2.data import transforms as T

    flip = utils.create_keypoint_hflip_indices(["t_demo_det_keypoints_train"])
    names = list(demo_det.DEMO_DET_KEYPOINT_NAMES)
    for r in DatasetCatalog.get("t_demo_det_keypoints_train"):
        squares = [a for a in r["annotations"] if a["category_id"] == 1]
        if squares:
            break
    w = r["width"]
    before = _keypoints(squares[0])
    tfm = T.TransformList([T.HFlipTransform(w)])
    after = utils.transform_instance_annotations(
        dict(squares[0]), tfm, (r["height"], w), keypoint_hflip_indices=flip
    )["keypoints"]
    i = {n: names.index(n) for n in names}
    assert after[i["top_left"], 0] < after[i["top_right"], 0]
    assert after[i["bottom_left"], 0] < after[i["bottom_right"], 0]
    np.testing.assert_allclose(after[i["top_left"], 0], w - before[i["top_right"], 0])


def test_keypoint_ap_of_the_ground_truth(demo_root, tmp_path):
    """COCO's keypoint evaluation with the demo's OKS sigmas: the ground truth scores 100, the
    same keypoints 3 px off score much less."""
    records = DatasetCatalog.get("t_demo_det_keypoints_val")

    def keypoint_ap(shift: float) -> float:
        ev = COCOEvaluator(
            "t_demo_det_keypoints_val",
            tasks=("keypoints",),
            output_dir=str(tmp_path / str(shift)),
            kpt_oks_sigmas=demo_det.DEMO_DET_KEYPOINT_OKS_SIGMAS,
        )
        ev.reset()
        for r in records:
            out = _as_predictions(r, with_masks=False)
            kp = torch.tensor(np.stack([_keypoints(a) for a in r["annotations"]]))
            kp[:, :, :2] += shift
            kp[:, :, 2] = 1.0  # a prediction's third value is its score
            out["instances"].pred_keypoints = kp.float()
            ev.process([r], [out])
        return ev.evaluate()["keypoints"]["AP"]

    assert keypoint_ap(0.0) == pytest.approx(100.0)
    assert keypoint_ap(3.0) < 60.0


def test_unreadable_annotations_raise(tmp_path):
    root = str(tmp_path / "demo_det")
    demo_det.ensure_demo_det(root)
    with open(os.path.join(root, "annotations", "instances_val.json"), "w") as f:
        f.write("{ not json")
    demo_det.register_demo_det(root, prefix="broken_demo_det")
    try:
        with pytest.raises(json.JSONDecodeError):
            DatasetCatalog.get("broken_demo_det_coco_val")
    finally:
        for split in demo_det.DEMO_DET_SPLITS:
            for fmt in demo_det.DEMO_DET_FORMATS:
                DatasetCatalog.remove(f"broken_demo_det_{fmt}_{split}")
                MetadataCatalog.remove(f"broken_demo_det_{fmt}_{split}")


def test_subset_ids_are_seeded_nested_and_sized():
    ids = list(range(1000, 3000, 2))  # 1000 ids
    a = subset_image_ids(ids, 0.05, seed=1)
    assert a == subset_image_ids(list(reversed(ids)), 0.05, seed=1)  # order of input irrelevant
    assert len(a) == 50 and set(a) <= set(ids)
    assert set(subset_image_ids(ids, 0.01, 1)) <= set(a) <= set(subset_image_ids(ids, 0.1, 1))
    assert subset_image_ids(ids, 0.05, seed=2) != a
    assert len(subset_image_ids(ids, 0.0001, 1)) == 1
    with pytest.raises(ValueError):
        subset_image_ids(ids, 1.5, 1)
    with pytest.raises(ValueError, match="not unique"):
        subset_image_ids([1, 1, 2], 0.5, 1)


def test_registered_subsets(demo_root):
    register_subset("t_demo_det_coco_train_25pct", "t_demo_det_coco_train", 0.25, seed=3)
    full = DatasetCatalog.get("t_demo_det_coco_train")
    sub = DatasetCatalog.get("t_demo_det_coco_train_25pct")
    assert len(sub) == 8
    assert {r["image_id"] for r in sub} <= {r["image_id"] for r in full}
    meta = MetadataCatalog.get("t_demo_det_coco_train_25pct")
    assert meta.evaluator_type == "coco" and meta.subset_of == "t_demo_det_coco_train"
    assert not hasattr(meta, "json_file")  # the whole set's json does not describe the subset
    # Names with a seed resolve on first use; the split depends on it.
    assert try_register("t_demo_det_coco_train_25pct_seed4")
    other = DatasetCatalog.get("t_demo_det_coco_train_25pct_seed4")
    assert {r["image_id"] for r in other} != {r["image_id"] for r in sub}
    assert not try_register("no_such_set_10pct")
    # COCO's builtin subsets exist without loading COCO.
    for pct in (1, 2, 5, 10):
        assert f"coco_2017_train_{pct}pct" in DatasetCatalog.list()
    assert MetadataCatalog.get("coco_2017_train_10pct").subset_fraction == 0.1


def test_unlabeled_pool_is_seeded_readable_and_reused(tmp_path):
    a = demo_det.write_unlabeled_images(str(tmp_path / "a"), 3, seed=7)
    b = demo_det.write_unlabeled_images(str(tmp_path / "b"), 3, seed=7)
    c = demo_det.write_unlabeled_images(str(tmp_path / "c"), 3, seed=8)
    assert len(a) == 3 and all(os.path.isfile(p) for p in a)
    read = lambda p: np.asarray(Image.open(p))  # noqa: E731
    assert all(np.array_equal(read(x), read(y)) for x, y in zip(a, b))  # same seed, same pool
    assert not np.array_equal(read(a[0]), read(c[0]))
    mtime = os.path.getmtime(a[0])
    assert demo_det.write_unlabeled_images(str(tmp_path / "a"), 3, seed=7) == a
    assert os.path.getmtime(a[0]) == mtime  # reused, not rewritten
