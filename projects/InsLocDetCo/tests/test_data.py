import json
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.utils.events import EventStorage
from insloc_testing import NO_PHOTOMETRIC
from PIL import Image, ImageOps

from insloc_detco.data import (
    MoCoV2Mapper,
    UnreadableImageError,
    build_pretrain_train_loader,
    get_pretrain_dataset_dicts,
    read_rgb_image,
)
from insloc_detco.data.datasets import DEMO_PHOTOS, ensure_registered, skimage_data_dir
from insloc_detco.modeling.meta_arch.moco import MoCoV2


def _save(path, array, mode=None, **kw):
    Image.fromarray(array, mode=mode).save(path, **kw)
    return str(path)


@pytest.fixture
def image_dir(tmp_path):
    """A folder with good images of every PIL mode and a few bad files."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    (tmp_path / "a").mkdir()  # a sub-folder: folder datasets are listed recursively
    good = {
        "rgb.jpg": _save(tmp_path / "a" / "rgb.jpg", rgb),
        "gray.png": _save(tmp_path / "gray.png", rgb[..., 0]),
        "rgba.png": _save(tmp_path / "rgba.png", np.dstack([rgb, np.full_like(rgb[..., 0], 128)])),
        "palette.gif": str(tmp_path / "palette.gif"),
        "cmyk.jpg": str(tmp_path / "cmyk.jpg"),
        "gray16.png": str(tmp_path / "gray16.png"),
    }
    Image.fromarray(rgb).convert("P").save(good["palette.gif"])
    Image.fromarray(rgb).convert("CMYK").save(good["cmyk.jpg"])
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 200)).save(good["gray16.png"])
    bad = {
        "corrupt.jpg": tmp_path / "corrupt.jpg",
        "truncated.png": tmp_path / "truncated.png",
        "tiny.png": tmp_path / "tiny.png",
        "empty.jpg": tmp_path / "empty.jpg",
    }
    bad["corrupt.jpg"].write_bytes(b"this is not a jpeg at all" * 10)
    full = tmp_path / "full.png"
    _save(full, rgb)
    bad["truncated.png"].write_bytes(full.read_bytes()[:200])
    full.unlink()
    _save(bad["tiny.png"], rgb[:8, :8])
    bad["empty.jpg"].write_bytes(b"")
    return tmp_path, good, {k: str(v) for k, v in bad.items()}


def test_read_converts_every_mode_to_rgb_uint8(image_dir):
    _, good, _ = image_dir
    for name, path in good.items():
        img = read_rgb_image(path, min_size=16)
        assert img.dtype == torch.uint8 and img.shape == (3, 40, 50), name
    gray = read_rgb_image(good["gray.png"])
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    # 16-bit grayscale is rescaled to the full 8-bit range, not clipped to white
    g16 = read_rgb_image(good["gray16.png"])
    assert g16.max() == 255 and g16.min() == 0
    # alpha is composited, not dropped: a half-transparent pixel moves towards the background
    rgba = read_rgb_image(good["rgba.png"])
    rgb = read_rgb_image(good["rgb.jpg"])
    assert not torch.equal(rgba, rgb)


def test_read_keeps_rgb_channel_order(tmp_path):
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = 255
    img = read_rgb_image(_save(tmp_path / "red.png", red))
    assert img[0].min() == 255 and img[1].max() == 0 and img[2].max() == 0


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_jpeg_fast_path_equals_pillow_and_applies_exif(tmp_path, mode):
    """Baseline JPEGs go through torchvision's decoder: Pillow's pixels, EXIF rotation kept."""
    rng = np.random.default_rng(1)
    array = rng.integers(0, 255, (30, 44, 3), dtype=np.uint8)
    image = Image.fromarray(array).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = str(tmp_path / "rotated.jpg")
    image.save(path, quality=92, exif=exif)
    with Image.open(path) as im:
        expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    out = read_rgb_image(path)
    assert out.shape == (3, 44, 30)  # rotated
    assert torch.equal(out, torch.from_numpy(expected.copy()).permute(2, 0, 1))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(open(path, "rb").read()[:-200])
    with pytest.raises(UnreadableImageError):
        read_rgb_image(str(truncated))


def test_read_rejects_bad_files(image_dir):
    _, _, bad = image_dir
    for name, path in bad.items():
        with pytest.raises(UnreadableImageError):
            read_rgb_image(path, min_size=16)


def test_read_caps_decoded_size(tmp_path):
    big = np.zeros((300, 600, 3), np.uint8)
    img = read_rgb_image(_save(tmp_path / "big.jpg", big), max_size=100)
    assert img.shape == (3, 100, 200)


def _mapper_cfg(cfg_loader, *opts):
    return cfg_loader("instant_test/pretrain_moco_v2.yaml", *opts)


def test_moco_mapper_outputs(cfg_loader, tmp_path):
    cfg = _mapper_cfg(cfg_loader)
    mapper = MoCoV2Mapper(cfg)
    rng = np.random.default_rng(0)
    path = _save(tmp_path / "x.png", rng.integers(0, 255, (90, 120, 3), dtype=np.uint8))
    out = mapper({"file_name": path, "image_id": 3})
    assert set(out) == {"view_q", "view_k", "image_id", "num_skipped"}
    for k in ("view_q", "view_k"):
        assert out[k].dtype == torch.uint8 and out[k].shape == (3, 64, 64)
    assert not torch.equal(out["view_q"], out["view_k"])  # independent augmentations
    assert out["num_skipped"] == 0 and out["image_id"] == 3


def test_moco_mapper_rgb_order_without_photometric_aug(cfg_loader, tmp_path):
    cfg = _mapper_cfg(cfg_loader, *NO_PHOTOMETRIC)
    img = np.zeros((80, 80, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 200, 100, 10
    out = MoCoV2Mapper(cfg)({"file_name": _save(tmp_path / "c.png", img), "image_id": 0})
    v = out["view_q"].float()
    assert torch.allclose(v.mean(dim=(1, 2)), torch.tensor([200.0, 100.0, 10.0]), atol=1.0)


def test_model_normalises_with_torchvision_statistics(cfg_loader):
    cfg = _mapper_cfg(cfg_loader)
    model = MoCoV2(cfg)
    img = torch.zeros(3, 4, 4, dtype=torch.uint8)
    img[0], img[1], img[2] = 255, 0, 128
    x = model.preprocess([img])
    mean = torch.tensor([123.675, 116.28, 103.53])
    std = torch.tensor([58.395, 57.12, 57.375])
    expected = (torch.tensor([255.0, 0.0, 128.0]) - mean) / std
    assert x.shape == (1, 3, 4, 4) and x.dtype == torch.float32
    assert torch.allclose(x[0, :, 0, 0], expected, atol=1e-5)


def test_mapper_skips_and_counts_bad_images(cfg_loader, image_dir):
    _, good, bad = image_dir
    mapper = MoCoV2Mapper(_mapper_cfg(cfg_loader))
    for path in bad.values():
        assert mapper({"file_name": path, "image_id": 0}) is None
    out = mapper({"file_name": good["rgb.jpg"], "image_id": 1})
    assert out["num_skipped"] == len(bad)  # reported with the next good record, then reset
    assert mapper({"file_name": good["gray.png"], "image_id": 2})["num_skipped"] == 0


def test_mapper_raises_when_everything_is_broken(cfg_loader, image_dir):
    _, _, bad = image_dir
    mapper = MoCoV2Mapper(_mapper_cfg(cfg_loader, "INPUT.PRETRAIN.MAX_CONSECUTIVE_FAILURES", 3))
    paths = list(bad.values())
    assert mapper({"file_name": paths[0], "image_id": 0}) is None
    assert mapper({"file_name": paths[1], "image_id": 0}) is None
    with pytest.raises(RuntimeError, match="first 3 images tried were all unreadable"):
        mapper({"file_name": paths[2], "image_id": 0})


def test_loader_replaces_and_counts_bad_images(cfg_loader, image_dir):
    root, good, bad = image_dir
    cfg = _mapper_cfg(
        cfg_loader,
        "DATASETS.TRAIN",
        (f"folder:{root}",),
        "DATALOADER.NUM_WORKERS",
        0,
        "SOLVER.IMS_PER_BATCH",
        4,
    )
    loader = build_pretrain_train_loader(cfg)
    seen = 0
    with EventStorage(0):
        for i, batch in enumerate(loader):
            assert len(batch) == 4  # no hole: skipped records are replaced
            assert all("num_skipped" not in d for d in batch)
            seen += 4
            if i == 9:
                break
    # 40 draws from 10 files of which 4 are bad: some bad ones were certainly hit and counted
    assert loader.num_skipped > 0


def test_datasets_folder_list_coco(tmp_path, image_dir):
    root, good, _ = image_dir
    n_folder = len(get_pretrain_dataset_dicts([f"folder:{root}"]))
    assert n_folder == len(list(root.rglob("*.*")))  # all image extensions, recursively
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\n\ngray.png\n" + good["rgb.jpg"] + "\n")
    dicts = get_pretrain_dataset_dicts([f"list:{lst}"])
    assert [d["file_name"] for d in dicts] == [str(tmp_path / "gray.png"), good["rgb.jpg"]]
    coco = tmp_path / "coco.json"
    images = [{"id": 1, "file_name": "gray.png"}]
    coco.write_text(json.dumps({"images": images, "annotations": [{"id": 1, "image_id": 1}]}))
    dicts = get_pretrain_dataset_dicts([f"coco:{coco}:{tmp_path}", f"list:{lst}"])
    assert [d["image_id"] for d in dicts] == [0, 1, 2]  # renumbered across sets
    assert set(dicts[0]) == {"file_name", "image_id"}  # labels ignored
    with pytest.raises(KeyError, match="not registered"):
        ensure_registered("no_such_dataset")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        get_pretrain_dataset_dicts([f"folder:{empty}"])


def test_demo_dataset_is_real_readable_photos():
    dicts = DatasetCatalog.get("pretrain_demo")
    assert len(dicts) == len(DEMO_PHOTOS)
    assert all(os.path.dirname(d["file_name"]) == skimage_data_dir() for d in dicts)
    for d in dicts:
        read_rgb_image(d["file_name"], min_size=64)
