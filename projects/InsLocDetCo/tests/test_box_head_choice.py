"""InsLoc's FPN protocol: a norm after fc1 for InsLoc weights only (InstanceLoc's configs)."""

import os

import fake_checkpoints
import pytest
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from insloc_testing import tiny_finetune

from insloc_detco.transfer import load_transfer_config
from insloc_detco.transfer.benchmarks import BENCHMARKS
from insloc_detco.transfer.box_head_choice import (
    FC_NORM_HEAD,
    PLAIN_HEAD,
    box_head_for_weights,
)
from insloc_detco.transfer.converter import load_model_zoo_pkl
from insloc_detco.transfer.runner import (
    RANDOM_INIT,
    check_weights,
    detector_state,
    prepare_weights,
    run_benchmarks,
)

pytestmark = pytest.mark.slow  # ResNet-50 checkpoints written and read, detectors built

INSLOC_FPN = BENCHMARKS["demo_coco_fpn"].config  # InsLoc's protocol, 4conv1fc


@pytest.fixture(scope="module")
def fakes(module_folder):
    folder = str(module_folder("fakes"))
    resnet_sd = fake_checkpoints.torchvision_resnet().state_dict()
    return fake_checkpoints.write_fakes(folder, resnet_sd, fake_checkpoints.insloc_heads())


@pytest.mark.parametrize(
    "source, head",
    [
        ("insloc_fpn", FC_NORM_HEAD),  # InstanceLoc's R_50_FPN_1x_insloc.yaml
        ("moco_v2", PLAIN_HEAD),  # R_50_FPN_1x_pretrained.yaml: InsLoc Table 4c's MoCo v2 row
        ("insloc_c4", PLAIN_HEAD),  # an InsLoc checkpoint without a pretrained box head
        ("detco_released", PLAIN_HEAD),
        ("torchvision", PLAIN_HEAD),
        (RANDOM_INIT, PLAIN_HEAD),
    ],
)
def test_head_follows_the_source(fakes, source, head):
    weights = fakes.get(source, source)
    for config in (INSLOC_FPN, BENCHMARKS["coco_fpn_1x"].config):
        cfg = load_transfer_config(config)
        chosen = box_head_for_weights(cfg, weights)
        assert chosen.MODEL.ROI_BOX_HEAD.NAME == head
        assert cfg.MODEL.ROI_BOX_HEAD.NAME == FC_NORM_HEAD  # the recipe itself is not changed
        assert (chosen.MODEL.ROI_BOX_HEAD.NUM_CONV, chosen.MODEL.ROI_BOX_HEAD.NUM_FC) == (4, 1)
        assert chosen.MODEL.ROI_BOX_HEAD.NORM == "naiveSyncBN"  # BN after each conv in both
    # Other protocols' heads are never touched; an explicit command-line head is kept.
    for name in ("demo_detco_coco_fpn", "demo_coco_c4", "demo_semi_retinanet"):
        cfg = load_transfer_config(BENCHMARKS[name].config)
        assert box_head_for_weights(cfg, weights) is cfg
    opts = ["MODEL.ROI_BOX_HEAD.NAME", FC_NORM_HEAD]
    cfg = load_transfer_config(INSLOC_FPN, opts)
    assert box_head_for_weights(cfg, weights, opts).MODEL.ROI_BOX_HEAD.NAME == FC_NORM_HEAD


def test_chosen_detectors_load_their_weights(fakes, tmp_path):
    """InsLoc-FPN weights fill the 4conv1fc head before the extra norm; MoCo v2 weights go into
    a detector without that norm, with every tensor loaded."""
    # conv1..4: weight + BN (5 tensors); fc1: weight, bias.
    for source, fc_norm, box_head_tensors in (
        ("insloc_fpn", True, 4 * 6 + 2),
        ("moco_v2", False, 0),
    ):
        cfg = box_head_for_weights(load_transfer_config(INSLOC_FPN), fakes[source])
        state = detector_state(cfg)
        assert any(k.startswith("roi_heads.box_head.fc_norm.") for k in state) == fc_norm
        pkl = prepare_weights(fakes[source], cfg, str(tmp_path), state)
        report = check_weights(cfg, pkl, state)
        assert report["model"] == len(state)
        head = build_model(cfg).roi_heads.box_head
        assert hasattr(head, "fc_norm") == fc_norm
        written = load_model_zoo_pkl(pkl)["model"]
        assert sum(k.startswith("roi_heads.box_head.") for k in written) == box_head_tensors


def test_run_records_the_choice(tmp_path):
    """The trial's config.yaml says which head a run used (random init: no norm after fc1)."""
    out = str(tmp_path / "transfer")
    opts = tiny_finetune(2)
    run_benchmarks(RANDOM_INIT, [BENCHMARKS["demo_coco_fpn"]], out, trials=1, opts=opts)
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(out, "demo_coco_fpn", "trial0", "config.yaml"))
    assert cfg.MODEL.ROI_BOX_HEAD.NAME == PLAIN_HEAD
