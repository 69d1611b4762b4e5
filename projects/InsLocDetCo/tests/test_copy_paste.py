"""InsLoc's copy-paste compositor: geometry of the composite and its box, both background
sources, the box-aware flip, the plain-crop ablation and worker-safe randomness."""

import os

import numpy as np
import pytest
import torch
from conftest import load_config
from insloc_testing import NO_PHOTOMETRIC
from PIL import Image

from insloc_detco.data import build_pretrain_train_loader
from insloc_detco.data.copy_paste import CopyPasteMapper, paste, sample_foreground

S = 128  # canvas
# Fixed canvas and paste sizes, no photometric augmentation: exact pixels can be checked.
FIXED = (
    "INPUT.PRETRAIN.COPY_PASTE.CANVAS_SIZE",
    str(S),
    "INPUT.PRETRAIN.COPY_PASTE.PASTE_SIZE",
    "(64, 127)",
    *NO_PHOTOMETRIC,
)
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (90,) * 3]


@pytest.fixture(scope="module")
def flat_images(module_folder):
    """Six images, each of one flat colour, of different sizes and aspects."""
    root = module_folder("flat")
    dicts = []
    for i, colour in enumerate(COLOURS):
        path = os.path.join(root, f"{i}.png")
        Image.new("RGB", (150 + 20 * i, 220 - 15 * i), colour).save(path)
        dicts.append({"file_name": path, "image_id": i})
    return dicts


def make_mapper(dicts, *opts):
    cfg = load_config("instant_test/pretrain_insloc_fpn.yaml", *FIXED, *opts)
    return CopyPasteMapper(cfg, dicts)


def colour_of(d):
    return torch.tensor(COLOURS[d["image_id"]], dtype=torch.uint8)


def check_composite(view, box, foreground, own_background=None):
    """Pixels inside the box are the foreground colour, all others one background colour."""
    assert view.shape == (3, S, S) and view.dtype == torch.uint8
    x1, y1, x2, y2 = box.tolist()
    assert all(v == int(v) for v in (x1, y1, x2, y2)), "the pasted box is on the pixel grid"
    assert 0 <= x1 < x2 <= S and 0 <= y1 < y2 <= S, f"box {box} is not inside the canvas"
    assert 64 <= max(x2 - x1, y2 - y1) < 127, f"pasted size {box} outside [64, 127)"
    inside = torch.zeros(S, S, dtype=torch.bool)
    inside[int(y1) : int(y2), int(x1) : int(x2)] = True
    assert (view[:, inside] == foreground[:, None]).all(), "box pixels are not the foreground"
    outside = view[:, ~inside]
    background = outside[:, 0]
    assert (outside == background[:, None]).all(), "pixels outside the box are not background"
    assert not torch.equal(background, foreground), "the background is the instance itself"
    return tuple(background.tolist())


def test_paste_box_is_the_pasted_region():
    torch.manual_seed(0)
    background = torch.randint(0, 256, (3, S, S), dtype=torch.uint8)
    for _ in range(20):
        h, w = torch.randint(1, S + 1, (2,)).tolist()
        foreground = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
        canvas, box = paste(background, foreground)
        x1, y1, x2, y2 = box.int().tolist()
        assert 0 <= x1 and x2 <= S and 0 <= y1 and y2 <= S
        assert torch.equal(canvas[:, y1:y2, x1:x2], foreground)
        canvas[:, y1:y2, x1:x2] = background[:, y1:y2, x1:x2]
        assert torch.equal(canvas, background), "pixels outside the box were modified"


def test_foreground_sizes_and_aspects():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    sizes = set()
    for _ in range(200):
        fg = sample_foreground(image, (0.2, 1.0), (0.5, 2.0), (128, 255))
        h, w = fg.shape[-2:]
        assert 128 <= max(h, w) < 255 and min(h, w) >= 1, (h, w)
        assert 0.5 / 1.1 <= w / h <= 2.0 * 1.1, f"aspect {w / h} outside (0.5, 2)"
        sizes.add((h, w))
    assert len(sizes) > 100, "sizes are not random"
    # The whole (0.5, 2) aspect range is used, not just MoCo's (3/4, 4/3).
    aspects = [w / h for h, w in sizes]
    assert min(aspects) < 0.7 and max(aspects) > 1.4


def test_dataset_backgrounds(flat_images):
    torch.manual_seed(0)
    mapper = make_mapper(flat_images)
    for d in flat_images * 3:
        out = mapper(d)
        fg = colour_of(d)
        bg_q = check_composite(out["view_q"], out["box_q"], fg)
        bg_k = check_composite(out["view_k"], out["box_k"], fg)
        assert bg_q != bg_k, "both views were pasted on the same background"
        assert not torch.equal(out["box_q"], out["box_k"])


def test_batch_backgrounds(flat_images):
    torch.manual_seed(0)
    mapper = make_mapper(flat_images, "INPUT.PRETRAIN.COPY_PASTE.BACKGROUND", "batch")
    reads, read = [], mapper.read
    mapper.read = lambda name: reads.append(name) or read(name)
    for i in range(3):
        dicts = flat_images[:4]
        batch = mapper.collate([mapper(d) for d in dicts])
        assert reads == [d["file_name"] for d in dicts] * (i + 1)  # no extra decode
        batch_colours = {tuple(COLOURS[d["image_id"]]) for d in dicts}
        for d, out in zip(dicts, batch):
            assert set(out) >= {"view_q", "box_q", "view_k", "box_k"}
            assert not any(k.startswith("foreground") or k == "background" for k in out)
            bg_q = check_composite(out["view_q"], out["box_q"], colour_of(d))
            bg_k = check_composite(out["view_k"], out["box_k"], colour_of(d))
            assert bg_q != bg_k and {bg_q, bg_k} <= batch_colours


def test_batch_backgrounds_need_three_images(flat_images):
    mapper = make_mapper(flat_images, "INPUT.PRETRAIN.COPY_PASTE.BACKGROUND", "batch")
    with pytest.raises(ValueError, match=">= 3"):
        mapper.collate([mapper(d) for d in flat_images[:2]])


def test_flip_moves_the_box(flat_images):
    mapper = make_mapper(flat_images, "INPUT.PRETRAIN.FLIP_PROB", "1.0")
    canvas = torch.randint(0, 256, (3, S, S), dtype=torch.uint8)
    box = torch.tensor([10.0, 20.0, 50.0, 100.0])
    view, flipped = mapper.finish_view(canvas, box)
    assert torch.equal(view, canvas.flip(-1))
    assert flipped.tolist() == [S - 50.0, 20.0, S - 10.0, 100.0]
    # And through the whole mapper: the flipped box still frames the instance.
    torch.manual_seed(1)
    for d in flat_images:
        out = mapper(d)
        check_composite(out["view_q"], out["box_q"], colour_of(d))


def test_photometric_applies_to_the_whole_composite(flat_images):
    out = make_mapper(flat_images, "INPUT.PRETRAIN.GRAYSCALE_PROB", "1.0")(flat_images[0])
    view = out["view_q"].int()
    assert (view[0] == view[1]).all() and (view[1] == view[2]).all(), "not all grayscale"
    assert out["view_q"].dtype == torch.uint8 and out["box_q"].dtype == torch.float32


def test_plain_views_without_copy_paste(flat_images):
    mapper = make_mapper(flat_images, "MODEL.INSLOC.COPY_PASTE", "False")
    out = mapper(flat_images[0])
    for v in "qk":
        assert out[f"view_{v}"].shape == (3, S, S)
        assert out[f"box_{v}"].tolist() == [0.0, 0.0, S, S]
        assert (out[f"view_{v}"] == colour_of(flat_images[0])[:, None, None]).all()


def test_loader_workers_do_not_share_random_streams(tmp_path):
    """The same image everywhere: boxes can only differ through the random stream. Two loader
    workers (and the batches of one worker) must not repeat each other."""
    for i in range(8):
        Image.new("RGB", (160, 120), COLOURS[0]).save(tmp_path / f"{i}.png")
    cfg = load_config(
        "instant_test/pretrain_insloc_fpn.yaml",
        *FIXED,
        "DATASETS.TRAIN",
        f"('folder:{tmp_path}',)",
        "DATALOADER.NUM_WORKERS",
        "2",
        "SOLVER.IMS_PER_BATCH",
        "4",
        "INPUT.PRETRAIN.COPY_PASTE.BACKGROUND",
        "batch",
    )
    it = iter(build_pretrain_train_loader(cfg))
    batches = [next(it) for _ in range(4)]  # workers 0, 1, 0, 1
    boxes = [np.stack([d["box_q"].numpy() for d in b]) for b in batches]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.array_equal(boxes[i], boxes[j]), f"batches {i} and {j} repeat"
