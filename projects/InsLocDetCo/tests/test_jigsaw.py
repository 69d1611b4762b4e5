"""DetCo's jigsaw local views and the JigsawMapper (incl. the optional RandAugment)."""

import pytest
import torch
from conftest import load_config

from insloc_detco.data import build_pretrain_mapper, get_pretrain_dataset_dicts
from insloc_detco.data.augmentation import PhotometricAugmentation
from insloc_detco.data.build import build_pretrain_train_loader
from insloc_detco.data.jigsaw import JigsawMapper, JigsawSampler, cut_patches
from insloc_detco.data.randaugment import BatchRandAugment


def coordinate_image(size: int) -> torch.Tensor:
    """(3, size, size) uint8 whose channel 0 is the row and channel 1 the column index."""
    ramp = torch.arange(size, dtype=torch.uint8)
    rows, cols = ramp[:, None].expand(size, size), ramp[None, :].expand(size, size)
    return torch.stack([rows, cols, torch.zeros_like(rows)])


def sampler(photometric=None, **kwargs):
    # No photometric change, so pixel values still tell where a patch came from.
    return JigsawSampler(photometric=photometric, **kwargs)


def test_nine_64px_patches_from_distinct_cells_of_the_255_crop():
    # Whole-image crop of a 255 image, no flip: the 255 crop is the image itself.
    jig = sampler(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    torch.manual_seed(0)
    out = jig.sample(coordinate_image(255))
    patches = out["patches"]
    assert patches.shape == (9, 3, 64, 64) and patches.dtype == torch.uint8
    assert out["crop_box"] == (0, 0, 255, 255)
    cells = []
    for k, patch in enumerate(patches.long()):
        y0, x0 = patch[0, 0, 0].item(), patch[1, 0, 0].item()
        # a contiguous, unflipped 64 x 64 window ...
        assert torch.equal(patch[0], (y0 + torch.arange(64))[:, None].expand(64, 64))
        assert torch.equal(patch[1], (x0 + torch.arange(64))[None, :].expand(64, 64))
        # ... lying inside one 85 x 85 cell
        assert y0 // 85 == (y0 + 63) // 85 and x0 // 85 == (x0 + 63) // 85
        cells.append((y0 // 85) * 3 + x0 // 85)
        # the returned geometry describes the content
        assert cells[-1] == out["cells"][k].item()
        assert (y0 % 85, x0 % 85) == tuple(out["offsets"][k].tolist())
    assert sorted(cells) == list(range(9))


def test_patches_are_shuffled_and_offsets_random():
    jig = sampler(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    torch.manual_seed(0)
    outs = [jig.sample(coordinate_image(255)) for _ in range(10)]
    orders = {tuple(o["cells"].tolist()) for o in outs}
    assert len(orders) > 5 and tuple(range(9)) not in orders
    offsets = torch.cat([o["offsets"] for o in outs])
    assert offsets.min() >= 0 and offsets.max() <= 85 - 64
    assert len(set(map(tuple, offsets.tolist()))) > 20  # not a fixed position per cell


def test_crop_covers_at_least_60_percent_and_patches_come_from_it():
    jig = sampler(crop_scale=(0.6, 1.0))
    torch.manual_seed(0)
    image = coordinate_image(250)  # coordinates still fit in uint8
    areas = []
    for _ in range(20):
        out = jig.sample(image)
        top, left, h, w = out["crop_box"]
        areas.append(h * w / 250**2)
        p = out["patches"].long()
        # bilinear resizing of a ramp stays within the crop's coordinates (+-1 for rounding)
        assert p[:, 0].min() >= top - 1 and p[:, 0].max() <= top + h
        assert p[:, 1].min() >= left - 1 and p[:, 1].max() <= left + w
    assert min(areas) >= 0.6 and max(areas) < 1.0


def test_flip_mirrors_the_crop_before_it_is_cut():
    flip_only = PhotometricAugmentation(
        color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, flip_prob=1.0
    )
    jig = sampler(photometric=flip_only, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    out = jig.sample(coordinate_image(255))
    for k, patch in enumerate(out["patches"].long()):
        cols = patch[1, 0]
        assert torch.all(cols[1:] - cols[:-1] == -1)  # columns run right to left
        # raster cell index is that of the flipped crop: its column 0 holds image column 254..
        col = out["cells"][k].item() % 3
        assert (254 - cols[0].item()) // 85 == col


def test_batched_cut_equals_per_set_cut():
    jig = sampler(crop_scale=(0.6, 1.0))
    torch.manual_seed(0)
    sets = [jig.sample(coordinate_image(250)) for _ in range(4)]
    batched = cut_patches(
        torch.stack([s["crop"] for s in sets]),
        torch.stack([s["offsets"] for s in sets]),
        torch.stack([s["cells"] for s in sets]),
        grid=3,
        patch_size=64,
    )
    assert torch.equal(batched, torch.stack([s["patches"] for s in sets]))


def test_mapper_outputs_and_registry():
    cfg = load_config("instant_test/pretrain_detco.yaml")
    dicts = get_pretrain_dataset_dicts(cfg.DATASETS.TRAIN)
    mapper = build_pretrain_mapper(cfg, dicts)
    assert isinstance(mapper, JigsawMapper)
    torch.manual_seed(0)
    out = mapper(dicts[0])
    s, p = cfg.INPUT.PRETRAIN.CROP_SIZE, cfg.INPUT.PRETRAIN.JIGSAW.PATCH_SIZE
    assert out["view_q"].shape == out["view_k"].shape == (3, s, s)
    assert out["patches_q"].shape == out["patches_k"].shape == (9, 3, p, p)
    assert all(out[k].dtype == torch.uint8 for k in ("view_q", "view_k", "patches_q", "patches_k"))
    assert not torch.equal(out["patches_q"], out["patches_k"])  # two independent samples
    # The local view gets the global photometric augmentation (same parameters, no RandAugment).
    local, global_ = mapper.jigsaw.photometric, mapper.photometric
    assert all(isinstance(a, PhotometricAugmentation) for a in (local, global_))
    assert torch.equal(local.jitter_range, global_.jitter_range)
    for attr in ("color_jitter_prob", "grayscale_prob", "blur_prob", "blur_sigma", "flip_prob"):
        assert getattr(local, attr) == getattr(global_, attr)


@pytest.mark.parametrize("ops", [0, 2])
def test_randaugment_option_acts_on_global_views_only(ops):
    cfg = load_config("instant_test/pretrain_detco.yaml", "INPUT.PRETRAIN.RANDAUGMENT_OPS", ops)
    mapper = JigsawMapper(cfg, None)
    assert mapper.jigsaw.photometric.randaugment is None
    randaugment = mapper.photometric.randaugment
    assert isinstance(randaugment, BatchRandAugment) == bool(ops)
    if ops:
        assert randaugment.num_ops == ops and randaugment.magnitude == 9
        # it runs on uint8 tensors after the crop: shape and dtype of the view are kept
        torch.manual_seed(0)
        view = mapper.view(torch.randint(0, 256, (3, 100, 120), dtype=torch.uint8))
        assert view.shape == (3, 64, 64) and view.dtype == torch.uint8


def test_device_placement_sends_uncut_crops():
    cfg = load_config("instant_test/pretrain_detco.yaml", "INPUT.PRETRAIN.AUGMENT_ON", "device")
    dicts = get_pretrain_dataset_dicts(cfg.DATASETS.TRAIN)
    mapper = build_pretrain_mapper(cfg, dicts)
    assert mapper.photometric is None and mapper.jigsaw.photometric is None
    out = mapper(dicts[0])
    side = 3 * cfg.INPUT.PRETRAIN.JIGSAW.CELL_SIZE
    assert "patches_q" not in out and out["jigsaw_q"].shape == (3, side, side)
    assert out["cells_k"].shape == (9,) and out["offsets_k"].shape == (9, 2)


@pytest.mark.slow
def test_loader_batches_carry_patch_sets():
    cfg = load_config("instant_test/pretrain_detco.yaml", "DATALOADER.NUM_WORKERS", 0)
    batch = next(iter(build_pretrain_train_loader(cfg)))
    assert len(batch) == cfg.SOLVER.IMS_PER_BATCH
    assert all(x["patches_q"].shape == (9, 3, 32, 32) for x in batch)
