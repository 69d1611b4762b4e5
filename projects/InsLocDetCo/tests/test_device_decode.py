"""INPUT.PRETRAIN.DECODE_ON: JPEGs decoded and cropped on the training device (here the CPU,
through the same code as CUDA) give the loader's views; what the device must not decode falls
back to the loader; what nobody can decode is skipped and counted."""

import os

import numpy as np
import pytest
import torch
from conftest import load_config
from detectron2.utils.events import EventStorage
from insloc_testing import run_train_net
from PIL import Image

from insloc_detco.data import build_pretrain_mapper, build_pretrain_train_loader
from insloc_detco.data.batch import BatchCollator
from insloc_detco.data.device_decode import decode_on_device, decode_views
from insloc_detco.data.reading import (
    EncodedJpeg,
    UnreadableImageError,
    jpeg_frame_marker,
    read_image_for_device,
    read_rgb_image,
)

MOCO = "instant_test/pretrain_moco_v2.yaml"
DETCO = "instant_test/pretrain_detco.yaml"
# Device decoding: photometric part on the device; no draft-mode cap (it would send every demo
# photo back to the loader).
DEVICE = ("INPUT.PRETRAIN.AUGMENT_ON", "device", "INPUT.PRETRAIN.MAX_DECODE_SIZE", 0)
# Resizing in float32 and rounding once (what CUDA runs) vs torchvision's fixed-point uint8
# kernel on the CPU (the loader): at most one level apart, on a minority of the pixels.
MAX_LEVEL_DIFF = 1
MAX_MEAN_DIFF = 0.3
NVJPEG_MEAN_DIFF = 2.0


def _photo(seed: int, size=(90, 120)) -> Image.Image:
    """A smooth random photo-like RGB image (noise would make every JPEG huge)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size[::-1], Image.BICUBIC)


def _save(path, image: Image.Image, **kwargs) -> str:
    image.save(path, **kwargs)
    return str(path)


def _kinds(tmp_path):
    """One file of every kind the reader tells apart."""
    photo = _photo(0)
    rotated = Image.Exif()
    rotated[0x0112] = 6  # rotate 90 degrees clockwise to display
    return {
        "baseline": _save(tmp_path / "baseline.jpg", photo, quality=90),
        "progressive": _save(tmp_path / "progressive.jpg", photo, progressive=True),
        "exif_rotated": _save(tmp_path / "rotated.jpg", photo, exif=rotated),
        "exif_upright": _save(tmp_path / "upright.jpg", photo, exif=Image.Exif()),
        "grayscale": _save(tmp_path / "gray.jpg", photo.convert("L")),
        "cmyk": _save(tmp_path / "cmyk.jpg", photo.convert("CMYK")),
        "png": _save(tmp_path / "photo.png", photo),
    }


def test_header_reading_matches_decoding(tmp_path):
    """Only baseline RGB JPEGs without rotation are left to the device, with the decoded size;
    every other kind is decoded here exactly as by read_rgb_image (EXIF rotation applied)."""
    files = _kinds(tmp_path)
    for kind, path in files.items():
        decoded = read_rgb_image(path)
        out = read_image_for_device(path)
        if kind in ("baseline", "exif_upright"):
            assert isinstance(out, EncodedJpeg), kind
            assert out.shape == tuple(decoded.shape)
            assert bytes(out.data.numpy()) == open(path, "rb").read()
        else:
            assert torch.is_tensor(out) and torch.equal(out, decoded), kind
    assert read_rgb_image(files["exif_rotated"]).shape == (3, 120, 90)  # rotated
    data = {k: open(p, "rb").read() for k, p in files.items()}
    assert jpeg_frame_marker(data["baseline"]) == 0xC0
    assert jpeg_frame_marker(data["progressive"]) == 0xC2
    assert jpeg_frame_marker(data["png"]) is None


def test_truncated_jpeg_is_skipped_as_by_the_loader(tmp_path):
    """A JPEG cut short (header intact) or without its EOI marker is not left to the device:
    decoded here, it is unreadable, as with loader decoding. Zero padding after EOI is fine."""
    data = open(_save(tmp_path / "a.jpg", _photo(1), quality=90), "rb").read()
    for name, cut in (("half.jpg", data[: len(data) // 2]), ("no_eoi.jpg", data[:-2])):
        path = tmp_path / name
        path.write_bytes(cut)
        for read in (read_rgb_image, read_image_for_device):
            with pytest.raises(UnreadableImageError, match=name):
                read(str(path))
    padded = tmp_path / "padded.jpg"
    padded.write_bytes(data + bytes(20))
    assert isinstance(read_image_for_device(str(padded)), EncodedJpeg)


def test_placement_options(cfg_loader):
    assert not decode_on_device(cfg_loader(MOCO, *DEVICE), True)  # default: loader
    assert decode_on_device(cfg_loader(MOCO, *DEVICE, "INPUT.PRETRAIN.DECODE_ON", "device"), True)
    auto = ("INPUT.PRETRAIN.DECODE_ON", "auto")
    assert not decode_on_device(cfg_loader(MOCO, *DEVICE, *auto), True)  # CPU model
    assert decode_on_device(cfg_loader(MOCO, *auto, "MODEL.DEVICE", "cuda"), True)
    assert not decode_on_device(cfg_loader(MOCO, *auto, "MODEL.DEVICE", "cuda"), False)
    on = ("INPUT.PRETRAIN.DECODE_ON", "device")
    with pytest.raises(ValueError, match="AUGMENT_ON=device"):
        decode_on_device(cfg_loader(MOCO, *on, "INPUT.PRETRAIN.AUGMENT_ON", "loader"), True)
    with pytest.raises(ValueError, match="CopyPasteMapper"):
        build_pretrain_mapper(cfg_loader("instant_test/pretrain_insloc_fpn.yaml", *DEVICE, *on))
    with pytest.raises(ValueError, match="DECODE_ON"):
        decode_on_device(cfg_loader(MOCO, "INPUT.PRETRAIN.DECODE_ON", "gpu"), True)


def _corpus(tmp_path, num: int = 6):
    root = tmp_path / "data"
    root.mkdir()
    sizes = [(90 + 7 * i, 130 - 5 * i) for i in range(num)]
    files = [_save(root / f"{i}.jpg", _photo(10 + i, size)) for i, size in enumerate(sizes)]
    return [{"file_name": f, "image_id": i} for i, f in enumerate(files)]


def _batch(config, where, dicts, seed=0):
    """One batch from the mapper and the loader's collate, decoded on the CPU if asked."""
    cfg = load_config(config, *DEVICE, "INPUT.PRETRAIN.DECODE_ON", where)
    mapper = build_pretrain_mapper(cfg, dicts)
    torch.manual_seed(seed)
    batch = BatchCollator(getattr(mapper, "collate", None))([mapper(dict(d)) for d in dicts])
    assert (batch.encoded is not None) == (where == "device")
    return batch, decode_views(batch, "cpu")


@pytest.mark.parametrize("config", [MOCO, DETCO])
def test_device_views_equal_the_loader_views(config, tmp_path):
    """Same records, same seed: the same crop boxes are drawn, and the views cut after
    decoding in the training process are the loader's within one level."""
    dicts = _corpus(tmp_path)
    loader, _ = _batch(config, "loader", dicts)
    device, skipped = _batch(config, "device", dicts)
    assert skipped == 0 and device.encoded is None
    assert sorted(device.tensors) == sorted(loader.tensors)
    for key, expected in loader.tensors.items():
        got = device.tensors[key]
        assert got.shape == expected.shape and got.dtype == expected.dtype, key
        diff = (got.int() - expected.int()).abs()
        assert diff.max() <= MAX_LEVEL_DIFF, key
        assert diff.float().mean() < MAX_MEAN_DIFF, key
    assert torch.equal(device[0]["view_q"], device.tensors["view_q"][0])  # per-sample access


def test_other_files_are_decoded_in_the_loader_and_merged(tmp_path):
    """A batch of JPEGs the device decodes and files it must not: every view in its place."""
    dicts = _corpus(tmp_path, 4)
    files = _kinds(tmp_path)
    for i, kind in enumerate(("png", "progressive", "cmyk")):
        dicts.insert(2 * i + 1, {"file_name": files[kind], "image_id": 10 + i})
    loader, _ = _batch(MOCO, "loader", dicts)
    device, _ = _batch(MOCO, "device", dicts)
    coded = device.encoded  # the last call decoded it; rebuild to look at the packing
    assert coded is None
    cfg = load_config(MOCO, *DEVICE, "INPUT.PRETRAIN.DECODE_ON", "device")
    mapper = build_pretrain_mapper(cfg, dicts)
    packed = BatchCollator()([mapper(dict(d)) for d in dicts]).encoded
    assert packed.index.tolist() == [0, 2, 4, 6] and packed.pixel_index.tolist() == [1, 3, 5]
    for key, expected in loader.tensors.items():
        assert (device.tensors[key].int() - expected.int()).abs().max() <= MAX_LEVEL_DIFF, key
    assert [d["image_id"] for d in device] == [d["image_id"] for d in dicts]


def test_file_failing_on_the_device_is_skipped_counted_and_replaced(tmp_path):
    """Complete header and EOI but corrupt scan data: nothing in the loader notices; the
    training process fails to decode it, counts it and gives its sample another's views."""
    dicts = _corpus(tmp_path, 4)
    good = open(dicts[1]["file_name"], "rb").read()
    rng = np.random.default_rng(0)
    middle = len(good) // 2
    garbage = rng.integers(0, 256, 300, dtype=np.uint8).tobytes()  # with stray markers
    corrupt = good[:middle] + garbage + good[middle + 300 :]
    with open(dicts[1]["file_name"], "wb") as f:
        f.write(corrupt)
    with pytest.raises(UnreadableImageError):
        read_rgb_image(dicts[1]["file_name"])  # the loader placement skips it
    assert isinstance(read_image_for_device(dicts[1]["file_name"]), EncodedJpeg)
    batch, skipped = _batch(MOCO, "device", dicts)
    assert skipped == 1
    assert len(batch) == 4 and batch.tensors["view_q"].shape[0] == 4
    assert any(
        torch.equal(batch.tensors["view_q"][1], batch.tensors["view_q"][j]) for j in (0, 2, 3)
    )


@pytest.mark.slow
def test_loader_worker_ships_files_and_counts_skips(tmp_path):
    """Through a loader worker process (pickled batches): views on the model's device, the
    unreadable files of the folder counted as skipped, as with loader decoding."""
    dicts = _corpus(tmp_path, 6)
    root = os.path.dirname(dicts[0]["file_name"])
    with open(os.path.join(root, "truncated.jpg"), "wb") as f:
        f.write(open(dicts[0]["file_name"], "rb").read()[:300])
    cfg = load_config(
        MOCO,
        *DEVICE,
        "INPUT.PRETRAIN.DECODE_ON",
        "device",
        "DATASETS.TRAIN",
        (f"folder:{root}",),
        "DATALOADER.NUM_WORKERS",
        1,
        "SOLVER.IMS_PER_BATCH",
        7,
    )
    loader = build_pretrain_train_loader(cfg)
    assert loader.decode_device == "cpu"
    it = iter(loader)
    with EventStorage(0):
        batches = [next(it) for _ in range(3)]
    for batch in batches:
        assert batch.encoded is None
        assert batch.tensors["view_q"].shape == (7, 3, 64, 64)
        assert batch.tensors["view_q"].dtype == torch.uint8
    assert loader.num_skipped > 0


@pytest.mark.slow
def test_train_net_moco_v2_with_device_decoding(tmp_path):
    """The instant MoCo v2 recipe trains with the views decoded and cut in the training
    process (the CPU here), and logs where it decodes."""
    out = tmp_path / "out"
    proc = run_train_net(
        "--config-file",
        MOCO,
        *DEVICE,
        "INPUT.PRETRAIN.DECODE_ON",
        "device",
        "SOLVER.MAX_ITER",
        4,
        "SOLVER.CHECKPOINT_PERIOD",
        100,
        "OUTPUT_DIR",
        out,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    log = (out / "log.txt").read_text()
    assert "JPEGs decoded on cpu" in log
    ckpt = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvjpeg)")
@pytest.mark.parametrize("config", [MOCO, DETCO])
def test_nvjpeg_views_are_close_to_the_loader_views(config, tmp_path):
    """nvjpeg's IDCT and chroma upsampling are not libjpeg-turbo's: the views differ by a few
    levels at colour edges, by less than NVJPEG_MEAN_DIFF on average (tolerance set before the
    first GPU run, from the decoders' documented differences; tighten it from its output)."""
    dicts = _corpus(tmp_path)
    loader, _ = _batch(config, "loader", dicts)
    cfg = load_config(config, *DEVICE, "INPUT.PRETRAIN.DECODE_ON", "device")
    mapper = build_pretrain_mapper(cfg, dicts)
    torch.manual_seed(0)
    batch = BatchCollator()([mapper(dict(d)) for d in dicts])
    assert decode_views(batch, "cuda") == 0
    for key, expected in loader.tensors.items():
        got = batch.tensors[key]
        assert got.is_cuda == (key.startswith(("view", "jigsaw"))), key
        diff = (got.cpu().int() - expected.int()).abs().float()
        print(f"{key}: nvjpeg vs libjpeg-turbo views, max {diff.max():.0f}, mean {diff.mean():.3f}")
        assert diff.mean() < NVJPEG_MEAN_DIFF, key
