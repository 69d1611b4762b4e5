"""INPUT.PRETRAIN.AUGMENT_ON: the photometric part of the views in the loader or on the device."""

import pytest
import torch
from conftest import load_config
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from insloc_testing import NO_PHOTOMETRIC

from insloc_detco.data import build_pretrain_mapper, get_pretrain_dataset_dicts
from insloc_detco.data.augmentation import PhotometricAugmentation, photometric_on_device

CONFIGS = {
    "moco": "instant_test/pretrain_moco_v2.yaml",
    "insloc_fpn": "instant_test/pretrain_insloc_fpn.yaml",
    "insloc_c4": "instant_test/pretrain_insloc_c4.yaml",
    "detco": "instant_test/pretrain_detco.yaml",
}


def test_auto_placement_follows_the_device():
    assert not photometric_on_device(load_config(CONFIGS["moco"]))  # instant configs: CPU
    assert photometric_on_device(load_config(CONFIGS["moco"], "MODEL.DEVICE", "cuda"))
    assert not photometric_on_device(
        load_config(CONFIGS["moco"], "MODEL.DEVICE", "cuda", "INPUT.PRETRAIN.AUGMENT_ON", "loader")
    )
    with pytest.raises(ValueError, match="AUGMENT_ON"):
        photometric_on_device(load_config(CONFIGS["moco"], "INPUT.PRETRAIN.AUGMENT_ON", "gpu"))


def _mapped(cfg, n=4):
    dicts = get_pretrain_dataset_dicts(cfg.DATASETS.TRAIN)
    mapper = build_pretrain_mapper(cfg, dicts)
    batch = [mapper(d) for d in dicts[:n]]
    batch = mapper.collate(batch) if hasattr(mapper, "collate") else batch
    for d in batch:
        d.pop("num_skipped", None)
    return mapper, batch


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_device_placement_trains_every_method(method):
    cfg = load_config(CONFIGS[method], "INPUT.PRETRAIN.AUGMENT_ON", "device")
    torch.manual_seed(0)
    mapper, batch = _mapped(cfg)
    # the loader does only the geometric part ...
    assert getattr(mapper, "photometric", None) is None
    model = build_model(cfg).train()
    # ... and the model owns the photometric part
    assert isinstance(model.augmentation, PhotometricAugmentation)
    with EventStorage(0):
        losses = model(batch)
        total = sum(losses.values())
        assert torch.isfinite(total)
        total.backward()
    assert all(p.grad is not None for p in model.encoder_q.backbone.parameters())


def test_device_augmentation_applies_in_training_only():
    cfg = load_config(CONFIGS["moco"], "INPUT.PRETRAIN.AUGMENT_ON", "device")
    model = build_model(cfg)
    views = [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8) for _ in range(4)]
    model.eval()
    plain = model.preprocess(views)
    expected = (torch.stack(views).float() - model.pixel_mean) / model.pixel_std
    assert torch.equal(plain, expected)
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(model.preprocess(views), expected)


def test_device_flip_moves_the_insloc_boxes():
    cfg = load_config(
        CONFIGS["insloc_fpn"],
        "INPUT.PRETRAIN.AUGMENT_ON",
        "device",
        "INPUT.PRETRAIN.FLIP_PROB",
        1.0,
        *NO_PHOTOMETRIC,
    )
    model = build_model(cfg).train()
    views = [torch.randint(0, 256, (3, 96, 96), dtype=torch.uint8) for _ in range(2)]
    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 30.0, 96.0]])
    x, flipped = model.preprocess_with_boxes(views, boxes)
    assert torch.equal(flipped, torch.tensor([[46.0, 20.0, 86.0, 60.0], [66.0, 0.0, 96.0, 96.0]]))
    expected = (torch.stack(views).flip(-1).float() - model.pixel_mean) / model.pixel_std
    torch.testing.assert_close(x, expected, atol=1e-4, rtol=0)


def test_detco_device_path_cuts_patches_like_the_loader():
    """Same crops, offsets and order: the device cut equals the loader's patches (no
    photometric change, so the two placements must agree pixel for pixel)."""
    off = [*NO_PHOTOMETRIC, "INPUT.PRETRAIN.FLIP_PROB", 0.0]
    cfg = load_config(CONFIGS["detco"], "INPUT.PRETRAIN.AUGMENT_ON", "device", *off)
    torch.manual_seed(0)
    _, batch = _mapped(cfg, n=2)
    model = build_model(cfg).train()
    patches = model.preprocess_patches(batch, "q")
    loader_cfg = load_config(CONFIGS["detco"], "INPUT.PRETRAIN.AUGMENT_ON", "loader", *off)
    mapper = build_pretrain_mapper(loader_cfg, None)
    expected = [
        mapper.jigsaw.cut(x["jigsaw_q"][None], x["cells_q"][None], x["offsets_q"][None])[0]
        for x in batch
    ]
    expected = model.normalize(torch.stack(expected))
    torch.testing.assert_close(patches, expected, atol=1e-4, rtol=0)
