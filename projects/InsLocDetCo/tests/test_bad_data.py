"""Bad data ends clearly and never aborts a usable data set: replacement of unreadable images
and when the data set counts as broken (every mapper), folder listing through symbolic links,
and the pixel cap checked from the header."""

import logging
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import load_config
from detectron2.utils.events import EventStorage
from insloc_testing import NO_PHOTOMETRIC, run_train_net
from PIL import Image, ImageFile

from insloc_detco.data import (
    MoCoV2Mapper,
    build_pretrain_mapper,
    build_pretrain_train_loader,
    get_pretrain_dataset_dicts,
)
from insloc_detco.data.datasets import list_image_folder
from insloc_detco.data.mapper import UnreadableDatasetError
from insloc_detco.data.reading import ImageTooLargeError, UnreadableImageError, read_rgb_image

# Every mapper, with the options that change how it reads images.
MAPPERS = {
    "moco": ("instant_test/pretrain_moco_v2.yaml",),
    "insloc_dataset_bg": ("instant_test/pretrain_insloc_fpn.yaml",),
    "insloc_batch_bg": (
        "instant_test/pretrain_insloc_c4.yaml",
        "INPUT.PRETRAIN.COPY_PASTE.BACKGROUND",
        "batch",
    ),
    "detco": ("instant_test/pretrain_detco.yaml",),
}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, idat: bytes, depth: int = 8, colour: int = 2) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _good(path, seed: int, size=(72, 90)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return str(path)


def _bad(path, kind: int):
    """One of several kinds of unreadable file, by ``kind`` modulo their number."""
    rng = np.random.default_rng(kind)
    path = str(path)
    kinds = [
        lambda: rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(),  # noise
        lambda: b"",  # empty
        lambda: b"Not found. This is an HTML error page served as an image.\n" * 5,
        lambda: _jpeg_bytes(rng)[:400],  # truncated JPEG
        lambda: _png(64, 64, zlib.compress(bytes(64 * 193)))[:60],  # truncated PNG
        lambda: _png(64, 64, rng.integers(0, 256, 500, dtype=np.uint8).tobytes()),  # bad data
    ]
    k = kind % (len(kinds) + 1)
    if k == len(kinds):  # readable but smaller than INPUT.PRETRAIN.MIN_IMAGE_SIZE
        Image.new("RGB", (8, 8), (10, 20, 30)).save(path)
    else:
        with open(path, "wb") as f:
            f.write(kinds[k]())
    return path


def _jpeg_bytes(rng) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _corpus(root, num_good: int, num_bad: int):
    os.makedirs(root, exist_ok=True)
    for i in range(num_good):
        _good(os.path.join(root, f"good{i}.png"), i)
    exts = (".jpg", ".png", ".jpeg", ".gif", ".bmp", ".webp")
    for i in range(num_bad):
        _bad(os.path.join(root, f"bad{i}{exts[i % len(exts)]}"), i)
    return str(root)


def _loader_cfg(mapper, root, *opts):
    return load_config(
        *MAPPERS[mapper],
        "DATASETS.TRAIN",
        (f"folder:{root}",),
        "DATALOADER.NUM_WORKERS",
        0,
        "SOLVER.IMS_PER_BATCH",
        4,
        *NO_PHOTOMETRIC,
        *opts,
    )


def _batches(cfg, num: int):
    loader = build_pretrain_train_loader(cfg)
    it = iter(loader)
    with EventStorage(0):
        batches = [next(it) for _ in range(num)]
    return loader, batches


# --- Unreadable images: tolerated while the data set is usable ---------------------------------


@pytest.mark.parametrize("mapper", sorted(MAPPERS))
@pytest.mark.parametrize("good,bad", [(2, 1), (2, 38), (1, 11)])
def test_every_mapper_trains_where_some_images_are_readable(mapper, good, bad, tmp_path):
    """2 readable + 1 unreadable, 5 % readable, a single readable image: every method gets
    full batches; what was skipped is counted."""
    torch.manual_seed(0)
    root = _corpus(tmp_path, good, bad)
    loader, batches = _batches(_loader_cfg(mapper, root), 3)
    for batch in batches:
        assert len(batch) == 4
        assert all(v.dtype == torch.uint8 for d in batch for k, v in d.items() if "view" in k)
    assert loader.num_skipped > 0


@pytest.mark.parametrize("mapper", ["insloc_dataset_bg", "moco"])
@pytest.mark.parametrize("fraction", [0.05, 0.02])
def test_large_sparse_corpus_never_aborts(mapper, fraction, monkeypatch):
    """A simulated corpus of 20000 files of which 5 % or 2 % decode, 400 samples: no abort (an
    InsLoc sample reads three images). Samples that return None are redrawn, as detectron2's
    MapDataset does without a file list."""
    rng = np.random.default_rng(0)
    names = [f"/corpus/{i}.jpg" for i in range(20000)]
    readable = set(rng.choice(names, int(fraction * len(names)), replace=False))
    image = torch.randint(0, 256, (3, 100, 120), dtype=torch.uint8)

    def fake_read(file_name, *args):
        if file_name not in readable:
            raise UnreadableImageError(f"{file_name}: corrupt")
        return image

    monkeypatch.setattr("insloc_detco.data.mapper.read_rgb_image", fake_read)
    dicts = [{"file_name": n, "image_id": i} for i, n in enumerate(names)]
    m = build_pretrain_mapper(load_config(*MAPPERS[mapper], *NO_PHOTOMETRIC), dicts)
    torch.manual_seed(0)
    skipped = 0
    for index in rng.integers(0, len(dicts), 400):
        out = m(dicts[index])
        while out is None:
            out = m(dicts[rng.integers(0, len(dicts))])
        skipped += out["num_skipped"]
    assert skipped > 400 * (1 - fraction) * 0.5


def test_failures_after_a_good_image_are_skipped_not_fatal(cfg_loader, tmp_path):
    """Without a file list (plain detectron2 retries), a run of failures after one good image
    only returns None; before any good image, K failures abort."""
    cfg = cfg_loader(*MAPPERS["moco"], "INPUT.PRETRAIN.MAX_CONSECUTIVE_FAILURES", 3)
    bad = [_bad(tmp_path / f"b{i}.jpg", i) for i in range(10)]
    good = _good(tmp_path / "g.png", 0)
    mapper = MoCoV2Mapper(cfg)
    assert mapper({"file_name": good, "image_id": 0})["num_skipped"] == 0
    for path in bad:
        assert mapper({"file_name": path, "image_id": 1}) is None
    assert mapper({"file_name": good, "image_id": 0})["num_skipped"] == len(bad)
    fresh = MoCoV2Mapper(cfg)
    assert fresh(dict(file_name=bad[0])) is None and fresh(dict(file_name=bad[1])) is None
    with pytest.raises(UnreadableDatasetError, match="first 3 images"):
        fresh(dict(file_name=bad[2]))


def test_unreadable_files_are_not_drawn_again(cfg_loader, tmp_path):
    """1 good image among 30 bad: each bad one is read at most once per worker for replacements
    and backgrounds, so InsLoc's three images per sample cost no endless re-reads."""
    root = _corpus(tmp_path, 1, 30)
    cfg = cfg_loader(*MAPPERS["insloc_dataset_bg"], *NO_PHOTOMETRIC)
    dicts = get_pretrain_dataset_dicts([f"folder:{root}"])
    mapper = build_pretrain_mapper(cfg, dicts)
    reads = []
    read = mapper.read
    mapper.read = lambda name: reads.append(name) or read(name)
    torch.manual_seed(0)
    for d in dicts * 2:
        assert mapper(d)["view_q"].shape[-1] == cfg.INPUT.PRETRAIN.COPY_PASTE.CANVAS_SIZE
    bad_reads = [r for r in reads if "bad" in os.path.basename(r)]
    records = [d["file_name"] for d in dicts * 2]
    # Each bad file: read as a sampled record (2 epochs) and at most once as a drawn image.
    for name in set(bad_reads):
        assert bad_reads.count(name) <= records.count(name) + 1, name


def test_data_set_dying_during_training_ends_clearly(cfg_loader, tmp_path):
    root = _corpus(tmp_path, 3, 0)
    dicts = get_pretrain_dataset_dicts([f"folder:{root}"])
    mapper = build_pretrain_mapper(cfg_loader(*MAPPERS["moco"]), dicts)
    assert mapper(dicts[0]) is not None
    for d in dicts:  # the mount goes away
        os.remove(d["file_name"])
    with pytest.raises(UnreadableDatasetError, match=r"every file of the data set \(3\)"):
        mapper(dicts[1])


# --- All unreadable: our error, whatever the size and the mapper --------------------------------


@pytest.mark.parametrize("mapper", sorted(MAPPERS))
@pytest.mark.parametrize("num", [1, 5, 50])
def test_all_unreadable_data_set_ends_with_a_clear_error(mapper, num, tmp_path):
    root = _corpus(tmp_path / "data", 0, num)
    cfg = _loader_cfg(mapper, root)
    with pytest.raises(UnreadableDatasetError, match="DATASETS.TRAIN") as e:
        _batches(cfg, 1)
    message = str(e.value)
    assert "broken" in message and str(tmp_path / "data") in message  # quotes bad files


@pytest.mark.slow
@pytest.mark.parametrize("num,limit", [(500, 1000), (300, 40)])
def test_all_unreadable_large_data_set_in_a_loader_worker(num, limit, tmp_path):
    """Through a loader worker process; below and above MAX_CONSECUTIVE_FAILURES."""
    root = _corpus(tmp_path, 0, num)
    cfg = _loader_cfg(
        "insloc_dataset_bg",
        root,
        "DATALOADER.NUM_WORKERS",
        1,
        "INPUT.PRETRAIN.MAX_CONSECUTIVE_FAILURES",
        limit,
    )
    expected = f"every file of the data set \\({num}\\)" if num < limit else f"first {limit} "
    with pytest.raises(UnreadableDatasetError, match=expected):
        _batches(cfg, 1)


# --- Folder listing through symbolic links ----------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_folder_lists_each_real_file_once(tmp_path, caplog):
    root = tmp_path / "data"
    for folder in ("sub", "other"):
        (root / folder).mkdir(parents=True)
    real = [
        _good(root / "a.png", 0),
        _good(root / "b.jpg", 1),
        _good(root / "sub" / "c.png", 2),
        _good(root / "other" / "d.png", 3),
    ]
    os.symlink("..", root / "sub" / "up")  # a loop
    os.symlink(root / "other", root / "also_other")  # a second path to a folder
    os.symlink("a.png", root / "alias.png")  # a second path to a file...
    os.symlink("other/d.png", root / "0_alias.png")  # ...seen before the file itself
    outside = tmp_path / "outside"
    outside.mkdir()
    extra = _good(outside / "e.png", 4)
    os.symlink(outside, root / "linked")  # a linked folder with a new file: followed
    os.symlink("gone.png", root / "sub" / "dangling.png")  # a link to nothing
    with caplog.at_level(logging.WARNING):
        files = list_image_folder(str(root))
    assert sorted(map(os.path.realpath, files)) == sorted(
        os.path.realpath(f) for f in real + [extra]
    )
    assert "left out 2 image paths and 2 folders" in caplog.text
    assert "and 1 dangling links" in caplog.text
    assert len(get_pretrain_dataset_dicts([f"folder:{root}"])) == 5


# --- The pixel cap -----------------------------------------------------------------------------


def _claims_size(fmt: str, path, width: int, height: int) -> str:
    """A small real file of ``fmt`` whose header claims ``width`` x ``height`` pixels."""
    path = str(path)
    if fmt == "PNG":
        with open(path, "wb") as f:  # pixel data far too short for the claimed size
            f.write(_png(width, height, zlib.compress(bytes(1000))))
        return path
    Image.new("RGB", (40, 30), (90, 120, 150)).save(path, fmt)
    data = bytearray(open(path, "rb").read())
    if fmt == "BMP":
        data[18:26] = struct.pack("<ii", width, height)
    elif fmt == "GIF":
        data[6:10] = struct.pack("<HH", width, height)
        descriptor = data.index(b"\x2c")  # the image's own size follows its position
        data[descriptor + 5 : descriptor + 9] = struct.pack("<HH", width, height)
    elif fmt == "JPEG":
        sof = data.index(b"\xff\xc0")
        data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["PNG", "BMP", "GIF", "JPEG"])
def test_pixel_cap_is_checked_from_the_header_for_every_format(fmt, tmp_path, monkeypatch):
    """12000 x 12000 (144 MP) is above the default cap but below Pillow's own error (179 MP):
    rejected from the header, even with Pillow's process-wide limit disabled."""
    cap = load_config(*MAPPERS["moco"]).INPUT.PRETRAIN.MAX_IMAGE_PIXELS
    path = _claims_size(fmt, tmp_path / f"huge.{fmt.lower()}", 12000, 12000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)

    def no_decode(self, *args):
        raise AssertionError("decoded an image over the cap")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(ImageTooLargeError, match="over the cap"):
        read_rgb_image(path, max_pixels=cap)


def test_pixel_cap_applies_to_decoded_pixels(tmp_path):
    # A real palette image that compresses well: 1200 x 1000 = 1.2 MP in a few kB.
    big = tmp_path / "big.png"
    Image.new("P", (1200, 1000), 3).save(big)
    assert os.path.getsize(big) < 20000
    with pytest.raises(ImageTooLargeError):
        read_rgb_image(str(big), max_pixels=1_000_000)
    assert read_rgb_image(str(big), max_pixels=1_200_000).shape == (3, 1000, 1200)
    # JPEG's draft decodes at 1/2, 1/4 or 1/8 scale: what it decodes is what is capped.
    photo = _good(tmp_path / "photo.jpg", 0, size=(400, 800))
    with pytest.raises(ImageTooLargeError):
        read_rgb_image(photo, max_pixels=50_000)
    assert read_rgb_image(photo, max_size=100, max_pixels=50_000).shape == (3, 100, 200)


def test_over_pillow_limit_says_which_limit(tmp_path):
    path = _claims_size("PNG", tmp_path / "bomb.png", 60000, 60000)
    with pytest.raises(ImageTooLargeError, match="PIL.Image.MAX_IMAGE_PIXELS"):
        read_rgb_image(path, max_pixels=0)


def test_mapper_skips_counts_and_names_the_key_for_large_images(tmp_path, caplog):
    _good(tmp_path / "ok.png", 0, size=(100, 100))
    Image.new("P", (400, 300), 1).save(tmp_path / "large.png")  # real, decodable
    _claims_size("BMP", tmp_path / "huge.bmp", 20000, 5000)  # header only
    cfg = _loader_cfg(
        "moco",
        tmp_path,
        "INPUT.PRETRAIN.MAX_IMAGE_PIXELS",
        100 * 100,
        "INPUT.PRETRAIN.MAX_DECODE_SIZE",
        0,
    )
    dicts = get_pretrain_dataset_dicts(cfg.DATASETS.TRAIN)
    mapper = build_pretrain_mapper(cfg, dicts)
    assert mapper.max_image_pixels == 100 * 100
    with caplog.at_level(logging.WARNING, logger="insloc_detco.data.mapper"):
        skipped = sum(mapper(d)["num_skipped"] for d in dicts)
    assert skipped >= 2
    assert "raise INPUT.PRETRAIN.MAX_IMAGE_PIXELS" in caplog.text
    for name in ("large.png", "huge.bmp"):
        assert name in caplog.text


def test_all_images_too_large_ends_naming_the_key(tmp_path):
    for i in range(3):
        Image.new("P", (300, 300), i).save(tmp_path / f"{i}.png")
    cfg = _loader_cfg("detco", tmp_path, "INPUT.PRETRAIN.MAX_IMAGE_PIXELS", 200 * 200)
    with pytest.raises(UnreadableDatasetError, match="INPUT.PRETRAIN.MAX_IMAGE_PIXELS"):
        _batches(cfg, 1)


def test_corrupt_png_pixel_data_is_unreadable_not_black(tmp_path):
    """Reading a PNG's EXIF decodes it, and detectron2's orientation step swallows errors:
    the image must be decoded (and fail) before that."""
    path = _good(tmp_path / "x.png", 0, size=(120, 160))
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[middle : middle + 64] = np.random.default_rng(1).integers(0, 256, 64, np.uint8).tobytes()
    open(path, "wb").write(data)
    with pytest.raises(UnreadableImageError, match="data stream"):
        read_rgb_image(path)


# --- End to end: train_net.py as a user runs it ------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_train_net_insloc_on_a_mostly_bad_folder_with_a_link_loop(tmp_path):
    """2 readable + 1 unreadable image and a `sub/up -> ..` loop: InsLoc trains, and
    SOLVER.EPOCHS counts the 3 real files (4 epochs at batch 4: MAX_ITER 3)."""
    root = _corpus(tmp_path / "data", 2, 1)
    os.makedirs(os.path.join(root, "sub"))
    os.symlink("..", os.path.join(root, "sub", "up"))
    out = tmp_path / "out"
    proc = run_train_net(
        "--config-file",
        "instant_test/pretrain_insloc_fpn.yaml",
        "DATASETS.TRAIN",
        f"('folder:{root}',)",
        "SOLVER.IMS_PER_BATCH",
        4,
        "SOLVER.EPOCHS",
        4,
        "SOLVER.CHECKPOINT_PERIOD",
        100,
        "OUTPUT_DIR",
        out,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    ckpt = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == 2


@pytest.mark.slow
def test_train_net_on_an_unreadable_folder_ends_with_our_error(tmp_path):
    root = _corpus(tmp_path / "data", 0, 7)
    proc = run_train_net(
        "--config-file",
        "instant_test/pretrain_detco.yaml",
        "DATASETS.TRAIN",
        f"('folder:{root}',)",
        "OUTPUT_DIR",
        tmp_path / "out",
    )
    assert proc.returncode != 0
    assert "every file of the data set (7) is unreadable" in proc.stderr
    assert "Sample larger than population" not in proc.stderr
