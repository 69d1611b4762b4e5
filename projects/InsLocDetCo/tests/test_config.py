import glob
import os

import pytest
from conftest import PROJECT_DIR, load_config
from detectron2.config import get_cfg

from insloc_detco import add_insloc_detco_config
from insloc_detco.engine import resolve_config_file

PRETRAIN_CONFIGS = sorted(
    os.path.relpath(p, os.path.join(PROJECT_DIR, "configs"))
    for p in glob.glob(os.path.join(PROJECT_DIR, "configs", "**", "*.yaml"), recursive=True)
    if os.sep + "transfer" not in p  # transfer configs have their own loader and tests
)


@pytest.mark.parametrize("name", PRETRAIN_CONFIGS)
def test_every_pretrain_config_loads(name):
    cfg = load_config(name)
    if not os.path.basename(name).startswith("Base-"):
        from detectron2.modeling import META_ARCH_REGISTRY

        META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)  # registered
        assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
        assert cfg.MODEL.BACKBONE.FREEZE_AT == 0


def test_unknown_key_fails_at_load_time(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        '_BASE_: "%s"\nMODEL:\n  CONTRAST:\n    TEMPERATUR: 0.1\n'
        % resolve_config_file("pretrain_moco_v2.yaml")
    )
    cfg = get_cfg()
    add_insloc_detco_config(cfg)
    with pytest.raises(KeyError, match="TEMPERATUR"):
        cfg.merge_from_file(str(bad))
    with pytest.raises(AssertionError, match="Non-existent key: INPUT.PRETRAIN.CROPSIZE"):
        load_config("pretrain_moco_v2.yaml", "INPUT.PRETRAIN.CROPSIZE", 10)  # command line


def test_full_scale_moco_v2_hyper_parameters():
    cfg = load_config("pretrain_moco_v2.yaml")
    c = cfg.MODEL.CONTRAST
    assert (c.DIM, c.QUEUE_SIZE, c.TEMPERATURE, c.MOMENTUM, c.MLP_HIDDEN_DIM) == (
        128,
        65536,
        0.2,
        0.999,
        2048,
    )
    s = cfg.SOLVER
    assert (s.IMS_PER_BATCH, s.BASE_LR, s.MOMENTUM, s.WEIGHT_DECAY, s.EPOCHS) == (
        256,
        0.03,
        0.9,
        1e-4,
        200,
    )
    assert s.LR_SCHEDULER_NAME == "WarmupCosineLR" and s.BASE_LR_END == 0.0
    assert s.REFERENCE_WORLD_SIZE == 8
    p = cfg.INPUT.PRETRAIN
    assert p.CROP_SIZE == 224 and tuple(p.CROP_SCALE) == (0.2, 1.0)
    assert tuple(p.COLOR_JITTER) == (0.4, 0.4, 0.4, 0.1) and p.COLOR_JITTER_PROB == 0.8
    assert p.GRAYSCALE_PROB == 0.2 and tuple(p.BLUR_SIGMA) == (0.1, 2.0) and p.BLUR_PROB == 0.5
    assert list(cfg.MODEL.PIXEL_MEAN) == [123.675, 116.28, 103.53]
    assert list(cfg.MODEL.PIXEL_STD) == [58.395, 57.12, 57.375]


def test_bare_config_name_resolves_and_missing_one_fails():
    assert resolve_config_file("pretrain_moco_v2.yaml").endswith(
        os.path.join("configs", "pretrain_moco_v2.yaml")
    )
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_config_file("pretrain_nothing.yaml")
