"""Linear lr scaling of a command-line batch, and how it composes with REFERENCE_WORLD_SIZE."""

import pytest
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer

from insloc_detco import add_insloc_detco_config
from insloc_detco.engine import describe_schedule, merge_opts_scaling_lr, resolve_config_file
from insloc_detco.transfer import load_transfer_config

RECIPE = "pretrain_moco_v2.yaml"  # batch 256 over REFERENCE_WORLD_SIZE 8, lr 0.03


def _pretrain_cfg(*opts):
    cfg = get_cfg()
    add_insloc_detco_config(cfg)
    cfg.merge_from_file(resolve_config_file(RECIPE))
    note = merge_opts_scaling_lr(cfg, [str(o) for o in opts])
    return cfg, note


def test_batch_override_scales_lr_linearly():
    cfg, note = _pretrain_cfg("SOLVER.IMS_PER_BATCH", 64, "SOLVER.REFERENCE_WORLD_SIZE", 0)
    assert cfg.SOLVER.IMS_PER_BATCH == 64
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.03 * 64 / 256)
    assert "0.03 x 64/256 = 0.0075" in note
    # The trainer runs it as is (no REFERENCE_WORLD_SIZE): batch 64 at lr 0.0075.
    run = DefaultTrainer.auto_scale_workers(cfg, 1)
    assert (run.SOLVER.IMS_PER_BATCH, run.SOLVER.BASE_LR) == (64, pytest.approx(0.0075))
    assert "batch 64 (1 process(es) x 64 images), base lr 0.0075 (= 0.03 per 256" in (
        describe_schedule(run, 1)
    )


def test_lr_given_on_the_command_line_is_used_as_given():
    cfg, note = _pretrain_cfg("SOLVER.BASE_LR", 0.05, "SOLVER.IMS_PER_BATCH", 64)
    assert cfg.SOLVER.BASE_LR == 0.05 and "as given" in note


def test_scaling_can_be_turned_off():
    cfg, note = _pretrain_cfg("SOLVER.IMS_PER_BATCH", 64, "SOLVER.SCALE_LR_WITH_BATCH", False)
    assert cfg.SOLVER.BASE_LR == 0.03 and "stays 0.03" in note


def test_no_batch_override_no_scaling_here():
    cfg, note = _pretrain_cfg("SOLVER.MAX_ITER", 10)
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, note) == (256, 0.03, None)


@pytest.mark.parametrize("world", [1, 4, 16])
def test_reference_world_size_alone_scales_once(world):
    """The recipe on `world` processes: detectron2's auto-scaling only (lr per image kept)."""
    cfg, _ = _pretrain_cfg()
    run = DefaultTrainer.auto_scale_workers(cfg, world)
    assert run.SOLVER.IMS_PER_BATCH == 32 * world
    assert run.SOLVER.BASE_LR == pytest.approx(0.03 * world / 8)


@pytest.mark.parametrize("world", [1, 4, 8])
def test_batch_override_and_reference_world_size_compose(world):
    """IMS_PER_BATCH 128 for the recipe's 8 processes, run on `world`: each step scales the lr
    with the batch, so the lr per image stays the recipe's 0.03 / 256."""
    cfg, _ = _pretrain_cfg("SOLVER.IMS_PER_BATCH", 128)
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.015)
    run = DefaultTrainer.auto_scale_workers(cfg, world)
    assert run.SOLVER.IMS_PER_BATCH == 16 * world
    assert run.SOLVER.BASE_LR / run.SOLVER.IMS_PER_BATCH == pytest.approx(0.03 / 256)


def test_dumped_config_reloads_with_the_same_lr(tmp_path):
    cfg, _ = _pretrain_cfg("SOLVER.IMS_PER_BATCH", 64, "SOLVER.REFERENCE_WORLD_SIZE", 0)
    path = tmp_path / "config.yaml"
    path.write_text(cfg.dump())  # what default_setup writes to OUTPUT_DIR
    again = get_cfg()
    add_insloc_detco_config(again)
    again.merge_from_file(str(path))
    assert merge_opts_scaling_lr(again, []) is None
    assert again.SOLVER.BASE_LR == pytest.approx(0.0075)


TRANSFER = "voc_faster_rcnn_R_50_C4_24k.yaml"


def test_transfer_batch_override_scales_lr():
    recipe = load_transfer_config(TRANSFER)
    cfg = load_transfer_config(TRANSFER, ["SOLVER.IMS_PER_BATCH", "4"])
    ratio = 4 / recipe.SOLVER.IMS_PER_BATCH
    assert recipe.SOLVER.IMS_PER_BATCH != 4 and cfg.SOLVER.IMS_PER_BATCH == 4
    assert cfg.SOLVER.BASE_LR == pytest.approx(recipe.SOLVER.BASE_LR * ratio)
    given = load_transfer_config(TRANSFER, ["SOLVER.IMS_PER_BATCH", "4", "SOLVER.BASE_LR", "0.02"])
    assert given.SOLVER.BASE_LR == 0.02
    # The switch works although transfer configs have detectron2's keys only (and stays out).
    off = load_transfer_config(
        TRANSFER, ["SOLVER.IMS_PER_BATCH", "4", "SOLVER.SCALE_LR_WITH_BATCH", "False"]
    )
    assert off.SOLVER.BASE_LR == recipe.SOLVER.BASE_LR and "SCALE_LR_WITH_BATCH" not in off.SOLVER
    with pytest.raises(ValueError, match="True or False"):
        load_transfer_config(TRANSFER, ["SOLVER.SCALE_LR_WITH_BATCH", "maybe"])
