"""Transfer configs, heads, and ``eval_transfer.py`` end to end on demo_det (CPU)."""

import glob
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
import time

import pytest
import torch
import torchvision
import yaml
from conftest import PROJECT_DIR
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from insloc_testing import run_train_net, tiny_finetune
from torch import nn

from insloc_detco.engine.runs import RANDOM_INIT, Launch
from insloc_detco.transfer import demo_det, load_transfer_config
from insloc_detco.transfer.benchmarks import BENCHMARKS, PROTOCOLS
from insloc_detco.transfer.converter import detector_resnet_keys, target_of_config
from insloc_detco.transfer.evaluators import evaluation_problems
from insloc_detco.transfer.results import COLUMNS
from insloc_detco.transfer.runner import (
    TransferError,
    check_weights,
    detector_state,
    prepare_weights,
    run_benchmarks,
)
from insloc_detco.transfer.trial_state import config_differences, prepare_trial_dir

TRANSFER_DIR = os.path.join(PROJECT_DIR, "configs", "transfer")
RECIPES = sorted(
    os.path.relpath(p, TRANSFER_DIR)
    for p in glob.glob(os.path.join(TRANSFER_DIR, "**", "*.yaml"), recursive=True)
    if not os.path.basename(p).startswith(("Base-", "Instant-"))
)
TINY = tiny_finetune(4)


def _eval_transfer():
    spec = importlib.util.spec_from_file_location(
        "eval_transfer", os.path.join(PROJECT_DIR, "eval_transfer.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------
# Configs and heads
# ------------------------------------------------------------------------------------------
PROTOCOL_OF_CONFIG = {b.config: b.protocol for b in BENCHMARKS.values()}


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_follows_protocol(name):
    cfg = load_transfer_config(name)
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.PIXEL_MEAN == [123.675, 116.28, 103.53]
    assert cfg.MODEL.PIXEL_STD == [58.395, 57.12, 57.375]
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False and cfg.MODEL.BACKBONE.FREEZE_AT == 0
    assert cfg.MODEL.RESNETS.NORM == "naiveSyncBN" and cfg.TEST.PRECISE_BN.ENABLED
    assert cfg.MODEL.WEIGHTS == ""  # never the supervised ImageNet default of the baseline
    protocol = PROTOCOL_OF_CONFIG[name]  # every recipe is a benchmark that names its protocol
    assert protocol in PROTOCOLS
    target = target_of_config(cfg)
    if target == "c4":
        assert cfg.MODEL.ROI_HEADS.NAME == "ExtraNormRes5ROIHeads"
        if not name.startswith("instant_test/"):  # DetCo caps training images at 1200 px
            assert cfg.INPUT.MAX_SIZE_TRAIN == (1200 if protocol == "DetCo" else 1333)
    else:
        assert cfg.MODEL.FPN.NORM == "naiveSyncBN"
    if target == "fpn" and protocol == "DetCo":  # standard 2fc box head, no norm in the heads
        assert cfg.MODEL.ROI_BOX_HEAD.NAME == "FastRCNNConvFCHead"
        assert (cfg.MODEL.ROI_BOX_HEAD.NUM_CONV, cfg.MODEL.ROI_BOX_HEAD.NUM_FC) == (0, 2)
        assert cfg.MODEL.ROI_BOX_HEAD.NORM == "" and cfg.MODEL.ROI_MASK_HEAD.NORM == ""
    elif target == "fpn":  # InsLoc: 4conv1fc with BN, BN in the mask head
        assert cfg.MODEL.ROI_BOX_HEAD.NAME == "ExtraNormConvFCHead"
        assert (cfg.MODEL.ROI_BOX_HEAD.NUM_CONV, cfg.MODEL.ROI_BOX_HEAD.NUM_FC) == (4, 1)
        assert cfg.MODEL.ROI_BOX_HEAD.NORM == "naiveSyncBN"
    if target == "retinanet":
        assert cfg.MODEL.RETINANET.NORM == ""
    if not name.startswith("instant_test/"):
        # Inherited from detectron2's baselines, not restated: batch 16, 2 images per GPU x 8
        # (Cityscapes: batch 8, lr 0.01).
        cityscapes = cfg.DATASETS.TRAIN[0].startswith("cityscapes")
        assert cfg.SOLVER.IMS_PER_BATCH == (8 if cityscapes else 16)
        assert cfg.SOLVER.BASE_LR == (0.01 if target == "retinanet" or cityscapes else 0.02)
        assert cfg.SOLVER.STEPS[-1] < cfg.SOLVER.MAX_ITER
        if cfg.SOLVER.MAX_ITER == 12000:  # DetCo's 12k schedule, in every protocol
            assert cfg.SOLVER.STEPS == (9000, 11000)


def test_recipe_schedules():
    voc = load_transfer_config("voc_faster_rcnn_R_50_C4_24k.yaml")
    assert (voc.SOLVER.MAX_ITER, voc.SOLVER.STEPS, voc.SOLVER.WARMUP_ITERS) == (
        24000,
        (18000, 22000),
        100,
    )
    assert voc.DATASETS.TRAIN == ("voc_2007_trainval", "voc_2012_trainval")
    assert voc.MODEL.ROI_HEADS.NUM_CLASSES == 20 and voc.INPUT.MIN_SIZE_TEST == 800
    assert load_transfer_config("coco_mask_rcnn_R_50_FPN_2x.yaml").SOLVER.MAX_ITER == 180000
    mini = load_transfer_config("mini_coco_mask_rcnn_R_50_C4_12ep.yaml")
    assert mini.DATASETS.TRAIN == ("coco_2017_train_10pct",) and mini.MODEL.MASK_ON
    assert mini.SOLVER.MAX_ITER == round(12 * round(0.1 * 118287) / 16)
    semi = load_transfer_config("coco_retinanet_R_50_FPN_12k_1pct.yaml", ["SOLVER.MAX_ITER", "7"])
    assert semi.DATASETS.TRAIN == ("coco_2017_train_1pct",) and semi.SOLVER.MAX_ITER == 7
    # DetCo's released recipes (github.com/xieenze/DetCo benchmarks/detection/configs).
    schedules = {
        "12k": (12000, (9000, 11000)),
        "1x": (90000, (60000, 80000)),
        "2x": (180000, (120000, 160000)),
    }
    detectors = {
        "mask_rcnn_R_50_FPN": "fpn",
        "mask_rcnn_R_50_C4": "c4",
        "retinanet_R_50_FPN": "retinanet",
    }
    for recipe, detector in detectors.items():
        for s, (max_iter, steps) in schedules.items():
            config = f"detco/coco_{recipe}_{s}.yaml"
            cfg = load_transfer_config(config)
            assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS) == (max_iter, steps)
            assert cfg.DATASETS.TRAIN == ("coco_2017_train",)
            assert cfg.MODEL.MASK_ON == (detector != "retinanet")
            bench = BENCHMARKS[f"detco_coco_{detector}_{s}"]
            assert bench.config == config and bench.protocol == "DetCo"
    for b in BENCHMARKS.values():
        load_transfer_config(b.config)  # every benchmark points at a loadable config


def test_detco_keypoint_cityscapes_and_semi_mask_rcnn_recipes():
    """DetCo's keypoint_rcnn_R_50_FPN_2x_moco.yaml, Cityscapes/mask_rcnn_R_50_FPN_moco.yaml and
    its 12k Mask R-CNN recipes on the COCO subsets (github.com/xieenze/DetCo)."""
    kp = load_transfer_config(BENCHMARKS["detco_coco_keypoint_fpn_2x"].config)
    assert kp.MODEL.KEYPOINT_ON and not kp.MODEL.MASK_ON and kp.MODEL.ROI_HEADS.NUM_CLASSES == 1
    assert kp.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS == 17 and kp.TEST.KEYPOINT_OKS_SIGMAS == []
    assert kp.MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA == 0.5 and kp.MODEL.RPN.POST_NMS_TOPK_TRAIN == 1500
    assert (kp.SOLVER.MAX_ITER, kp.SOLVER.STEPS) == (180000, (120000, 160000))
    assert kp.DATASETS.TRAIN == ("keypoints_coco_2017_train",)
    assert kp.DATASETS.TEST == ("keypoints_coco_2017_val",)
    assert kp.INPUT.MIN_SIZE_TRAIN == (640, 672, 704, 736, 768, 800)
    assert evaluation_problems(kp) == []  # COCO's 17 keypoints, named in detectron2's metadata
    cs = load_transfer_config(BENCHMARKS["detco_cityscapes_fpn"].config)
    assert cs.MODEL.MASK_ON and cs.MODEL.ROI_HEADS.NUM_CLASSES == 8
    assert (cs.SOLVER.MAX_ITER, cs.SOLVER.STEPS, cs.SOLVER.IMS_PER_BATCH) == (24000, (18000,), 8)
    assert cs.INPUT.MIN_SIZE_TRAIN == tuple(range(800, 1025, 32))
    assert cs.INPUT.MIN_SIZE_TRAIN_SAMPLING == "choice" and cs.INPUT.MIN_SIZE_TEST == 1024
    assert (cs.INPUT.MAX_SIZE_TRAIN, cs.INPUT.MAX_SIZE_TEST) == (2048, 2048)
    assert cs.TEST.EVAL_PERIOD == 0 and cs.MODEL.WEIGHTS == ""  # not the COCO model of the zoo
    assert cs.DATASETS.TEST == ("cityscapes_fine_instance_seg_val",)
    assert MetadataCatalog.get(cs.DATASETS.TEST[0]).evaluator_type == "cityscapes_instance"
    for det in ("FPN", "C4"):
        full = load_transfer_config(f"detco/coco_mask_rcnn_R_50_{det}_12k.yaml")
        for p in (1, 2, 5, 10):
            bench = BENCHMARKS[f"semi_coco_{p}pct_mask_rcnn_{det.lower()}_12k"]
            semi = load_transfer_config(bench.config)
            assert semi.DATASETS.TRAIN == (f"coco_2017_train_{p}pct",)
            assert bench.protocol == "DetCo" and bench.trials == 3
            semi.DATASETS.TRAIN = full.DATASETS.TRAIN
            assert semi.dump() == full.dump()  # only the training set differs
    demo = load_transfer_config(BENCHMARKS["demo_detco_keypoint_fpn"].config)
    assert demo.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS == len(demo_det.DEMO_DET_KEYPOINT_NAMES)
    assert demo.TEST.KEYPOINT_OKS_SIGMAS == list(demo_det.DEMO_DET_KEYPOINT_OKS_SIGMAS)


def test_what_evaluators_need_is_checked_before_training(tmp_path, monkeypatch):
    """Keypoint names and OKS sigmas, cityscapesScripts, one machine for Cityscapes: clear errors
    from the configs alone, before any data is read or any process starts."""
    kp = BENCHMARKS["demo_detco_keypoint_fpn"].config
    assert evaluation_problems(load_transfer_config(kp)) == []
    wrong = load_transfer_config(kp, ["TEST.KEYPOINT_OKS_SIGMAS", "[0.1, 0.1]"])
    assert evaluation_problems(wrong) == [
        "TEST.KEYPOINT_OKS_SIGMAS has 2 values for 5 keypoints: give one OKS sigma per keypoint "
        "(empty only for COCO's 17 person keypoints, whose sigmas pycocotools knows)."
    ]
    unnamed = load_transfer_config(kp, ["DATASETS.TRAIN", "('demo_det_coco_train',)"])
    assert "data set 'demo_det_coco_train' names no keypoints" in evaluation_problems(unnamed)[0]
    cs = load_transfer_config(BENCHMARKS["demo_detco_cityscapes_fpn"].config)
    assert evaluation_problems(cs) == []
    assert "run it on one machine" in " ".join(evaluation_problems(cs, num_machines=2))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, *a: None if n == "cityscapesscripts" else real_find_spec(n, *a),
    )
    assert (
        "cityscapesscripts, which are not installed: pip install cityscapesscripts"
        in (evaluation_problems(cs)[0])
    )
    monkeypatch.undo()
    # Through `run`: refused before anything is read or launched.
    out = str(tmp_path / "out")
    with pytest.raises(TransferError, match="TEST.KEYPOINT_OKS_SIGMAS has 2 values"):
        run_benchmarks(
            RANDOM_INIT,
            [BENCHMARKS["demo_detco_keypoint_fpn"]],
            out,
            opts=["TEST.KEYPOINT_OKS_SIGMAS", "[0.1, 0.1]"],
        )
    assert not os.path.isdir(os.path.join(out, "demo_detco_keypoint_fpn"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, columns",
    [
        ("demo_detco_keypoint_fpn", {"AP", "AP50", "AP75", "APkp", "APkp50", "APkp75"}),
        ("demo_detco_cityscapes_fpn", {"APmask", "APmask50"}),  # cityscapesScripts: masks only
        ("demo_semi_mask_rcnn_fpn", {"AP", "AP50", "AP75", "APmask", "APmask50"}),
    ],
)
def test_detco_tasks_run_and_report_their_metrics(name, columns, tmp_path):
    """Keypoint R-CNN (COCO keypoint AP), Cityscapes Mask R-CNN (cityscapesScripts' AP) and
    semi-supervised Mask R-CNN fine-tune from random init on generated data and report their
    evaluator's numbers."""
    out = str(tmp_path / "transfer")
    opts = tiny_finetune(2)
    result = run_benchmarks(RANDOM_INIT, [BENCHMARKS[name]], out, trials=1, opts=opts)[name]
    assert set(result["summary"]) == columns
    assert all(0 <= s["mean"] <= 100 for s in result["summary"].values())
    header = open(os.path.join(out, "results.md")).read().splitlines()[0]
    assert [c for c in header.split(" | ") if c in COLUMNS] == [c for c in COLUMNS if c in columns]
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(out, name, "trial0", "config.yaml"))
    assert cfg.DATASETS.TRAIN == load_transfer_config(BENCHMARKS[name].config).DATASETS.TRAIN


def test_extra_norm_heads_and_stock_reload(tmp_path):
    c4 = load_transfer_config("instant_test/coco_mask_rcnn_R_50_C4.yaml")
    model = build_model(c4)
    res5 = model.roi_heads.res5
    assert [n for n, _ in res5.named_children()] == ["0", "1", "2", "norm"]
    # In training the extra BN normalises res5's output per channel.
    res5.train()
    y = res5(torch.randn(4, 1024, 6, 6))
    assert y.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (y.var(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-2

    fpn = load_transfer_config("instant_test/coco_mask_rcnn_R_50_FPN.yaml")
    head = build_model(fpn).roi_heads.box_head
    assert isinstance(head.fc_norm, nn.BatchNorm2d) and head.output_shape.channels == 1024
    head.train()
    out = head(torch.randn(6, 256, 7, 7))
    assert out.shape == (6, 1024) and out.mean(0).abs().max() < 1e-4

    # The dumped, fully resolved config loads with stock detectron2 and builds the same model.
    path = tmp_path / "config.yaml"
    path.write_text(fpn.dump())
    stock = get_cfg()
    stock.merge_from_file(str(path))
    assert stock.MODEL.ROI_BOX_HEAD.NAME == "ExtraNormConvFCHead"
    assert set(build_model(stock).state_dict()) == set(build_model(fpn).state_dict())


@pytest.fixture(scope="module")
def demo_names(module_folder):
    """demo_det in a temporary folder, registered as t_demo_det_* (the default root is cwd's)."""
    root = str(module_folder("data") / "demo_det")
    demo_det.register_demo_det(root, prefix="t_demo_det")
    yield "t_demo_det"
    for split in demo_det.DEMO_DET_SPLITS:
        for fmt in demo_det.DEMO_DET_FORMATS:
            DatasetCatalog.remove(f"t_demo_det_{fmt}_{split}")
            MetadataCatalog.remove(f"t_demo_det_{fmt}_{split}")


def test_fpn_detector_trains_a_step(demo_names):
    """The FPN recipe (naiveSyncBN everywhere, masks) runs a training step on demo_det."""
    from detectron2.data import build_detection_train_loader

    cfg = load_transfer_config(
        "instant_test/coco_mask_rcnn_R_50_FPN.yaml",
        ["DATASETS.TRAIN", f"('{demo_names}_coco_train',)"],
    )
    model = build_model(cfg).train()
    batch = next(iter(build_detection_train_loader(cfg)))
    with EventStorage():
        losses = model(batch)
    assert {"loss_cls", "loss_box_reg", "loss_mask"} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.roi_heads.box_head.fc_norm.weight.grad is not None


# ------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moco_checkpoint(module_folder):
    """A real MoCo v2 instant pretraining run (train_net.py, ~15 s)."""
    out = str(module_folder("pretrain_moco"))
    proc = run_train_net(
        "--config-file",
        "instant_test/pretrain_moco_v2.yaml",
        "OUTPUT_DIR",
        out,
        "SOLVER.CHECKPOINT_PERIOD",
        "100",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return os.path.join(out, "model_final.pth")


@pytest.mark.slow
def test_run_end_to_end_and_rerun_skips(moco_checkpoint, tmp_path):
    out = str(tmp_path / "transfer")
    env = dict(os.environ, OMP_NUM_THREADS="1", DETECTRON2_DATASETS=str(tmp_path / "data"))
    cmd = [
        sys.executable,
        os.path.join(PROJECT_DIR, "eval_transfer.py"),
        "run",
        moco_checkpoint,
        "--benchmark",
        "demo_voc_c4",
        "--trials",
        "2",
        "--output-dir",
        out,
        *TINY,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert wall < 300

    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)["demo_voc_c4"]
    assert results["target"] == "c4" and len(results["trials"]) == 2
    assert [t["seed"] for t in results["trials"]] == [1, 2]
    for t in results["trials"]:
        assert set(t["metrics"]["bbox"]) >= {"AP", "AP50", "AP75"}
        assert t["max_iter"] == 4
    summary = results["summary"]
    assert set(summary) == {"AP", "AP50", "AP75"}  # no masks in VOC
    assert summary["AP"]["n"] == 2 and summary["AP"]["std"] is not None
    table = open(os.path.join(out, "results.md")).read()
    assert "| demo_voc_c4 |" in table and "±" in table
    assert os.path.isfile(os.path.join(out, "weights", os.path.basename(results["weights"])))

    # Each trial dumped a fully resolved config that stock detectron2 loads.
    trial0 = os.path.join(out, "demo_voc_c4", "trial0")
    text = open(os.path.join(trial0, "config.yaml")).read()
    assert "_BASE_" not in text and "_MODEL_ZOO_BASE_" not in text
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(trial0, "config.yaml"))
    assert cfg.MODEL.WEIGHTS == results["weights"] and cfg.SEED == 1
    assert os.path.isfile(os.path.join(trial0, "model_final.pth"))

    # Re-running the same command skips finished trials: nothing is trained again (the
    # default demo_det names now resolve under cwd's datasets/: the same generated set).
    stamp = os.path.getmtime(os.path.join(trial0, "results.json"))
    again = run_benchmarks(moco_checkpoint, [BENCHMARKS["demo_voc_c4"]], out, trials=2, opts=TINY)
    assert os.path.getmtime(os.path.join(trial0, "results.json")) == stamp
    assert again["demo_voc_c4"]["summary"]["AP"]["values"] == summary["AP"]["values"]


@pytest.mark.slow
def test_cli_list_and_convert(moco_checkpoint, tmp_path, capsys):
    cli = _eval_transfer()
    assert cli.main(["--list"]) == 0
    listing = capsys.readouterr().out
    for name in (
        "voc_c4_24k",
        "coco_fpn_1x",
        "mini_coco_c4_12ep",
        "semi_coco_1pct_retinanet_12k",
        "detco_coco_fpn_12k",
        "detco_coco_c4_1x",
        "detco_coco_retinanet_12k",
    ):
        assert name in listing
    assert "protocol" in listing and "DetCo (Xie et al. 2021, released configs)" in listing
    pkl = str(tmp_path / "moco.pkl")
    assert cli.main(["convert", moco_checkpoint, pkl]) == 0  # auto: MoCo v2 -> layout-neutral
    printed = capsys.readouterr().out
    assert "Detected: InsLocDetCo MoCoV2 pretraining checkpoint" in printed
    assert "res5.*" in printed and "key (momentum) encoder" in printed and "target 'any'" in printed
    with open(pkl, "rb") as f:
        data = pickle.load(f)
    assert data["target"] == "any" and data["meta_architecture"] == "MoCoV2"
    assert data["matching_heuristics"] is True and "res4.5.conv3.weight" in data["model"]
    assert cli.main(["convert", moco_checkpoint, pkl, "--target", "c4"]) == 0  # replaces ours
    with open(pkl, "rb") as f:
        assert "backbone.res4.5.conv3.weight" in pickle.load(f)["model"]


@pytest.mark.slow
def test_cli_convert_never_destroys_a_file(moco_checkpoint, tmp_path, capsys):
    """`convert X.pth X.pth` replaced a 509 MB checkpoint with a 168 MB pickle, silently."""
    cli = _eval_transfer()
    copy = str(tmp_path / "model_final.pth")
    shutil.copy(moco_checkpoint, copy)
    before = open(copy, "rb").read()
    assert cli.main(["convert", copy, copy]) == 2
    err = capsys.readouterr().err.strip()
    assert "is the input checkpoint" in err and len(err.splitlines()) == 1
    other = str(tmp_path / "other.pth")  # another file that is not a conversion
    shutil.copy(moco_checkpoint, other)
    assert cli.main(["convert", copy, other]) == 2
    assert "not a conversion written by InsLocDetCo" in capsys.readouterr().err
    assert open(copy, "rb").read() == before and open(other, "rb").read() == before
    assert cli.main(["convert", copy, str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert cli.main(["convert", copy, os.path.join(copy, "out.pkl")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert not glob.glob(str(tmp_path / "*.tmp")) and not glob.glob(str(tmp_path / ".*.tmp"))
    assert cli.main(["convert", copy, other, "--force"]) == 0  # explicit: replaced
    assert open(other, "rb").read() != before


def test_clear_errors(moco_checkpoint, tmp_path, capsys):
    cli = _eval_transfer()
    out = str(tmp_path / "out")
    # A detector checkpoint with an incomplete ResNet.
    wrong = str(tmp_path / "detector.pth")
    torch.save({"model": {"backbone.res2.0.conv1.weight": torch.ones(1)}}, wrong)
    assert cli.main(["run", wrong, "--benchmark", "demo_voc_c4", "--output-dir", out]) == 2
    assert "detectron2 C4 detector lacks ResNet stage(s)" in capsys.readouterr().err
    # Weights of another name layout: the message names what it found.
    other = str(tmp_path / "other.pth")
    torch.save({"state_dict": {"trunk.block1.weight": torch.ones(3)}}, other)
    assert cli.main(["run", other, "--benchmark", "demo_voc_c4", "--output-dir", out]) == 2
    assert (
        "Unrecognised weights: 1 tensors named like trunk.block1.weight: 3 (in "
        "'state_dict')" in capsys.readouterr().err
    )
    # A ResNet the benchmark's detector would not use (ResNet-18 for an R-50 recipe).
    r18 = str(tmp_path / "resnet18.pth")
    torch.save(torchvision.models.resnet18().state_dict(), r18)
    assert cli.main(["run", r18, "--benchmark", "demo_voc_c4", "--output-dir", out]) == 2
    assert "ResNet does not fit this detector" in capsys.readouterr().err
    # A file that is no checkpoint at all.
    garbage = tmp_path / "model_final.pth"
    garbage.write_bytes(b"\x00garbage")
    assert cli.main(["run", str(garbage), "--benchmark", "demo_voc_c4", "--output-dir", out]) == 2
    assert "Cannot read" in capsys.readouterr().err
    # Unknown benchmark.
    assert cli.main(["run", r18, "--benchmark", "voc_c5", "--output-dir", out]) == 2
    assert "Unknown benchmark 'voc_c5'" in capsys.readouterr().err
    assert not os.path.isdir(os.path.join(out, "demo_voc_c4"))  # nothing launched


@pytest.mark.slow
def test_run_places_weights_for_each_benchmark(moco_checkpoint, tmp_path):
    """A .pkl converted for one layout is converted again for the benchmark's detector, keeping
    what it uses; a file that would leave tensors unused is refused."""
    cli = _eval_transfer()
    pkl = str(tmp_path / "moco_c4.pkl")
    assert cli.main(["convert", moco_checkpoint, pkl, "--target", "c4"]) == 0
    for name in ("demo_coco_fpn", "demo_voc_c4", "demo_semi_retinanet"):
        cfg = load_transfer_config(BENCHMARKS[name].config)
        state = detector_state(cfg)
        placed = prepare_weights(pkl, cfg, str(tmp_path / "out"), state)
        report = check_weights(cfg, placed, state)
        assert report["loaded"] == len(detector_resnet_keys(state)) + 53  # + BN counters
    fpn_cfg = load_transfer_config(BENCHMARKS["demo_coco_fpn"].config)
    with pytest.raises(TransferError, match="would not be used by the detector"):
        check_weights(fpn_cfg, pkl)  # backbone.res4.* names: no such tensors in an FPN


@pytest.mark.slow
def test_run_takes_an_official_moco_checkpoint(tmp_path):
    """`run` accepts MoCo's own checkpoint (main_moco.py's .pth.tar) directly."""
    resnet = torchvision.models.resnet50().state_dict()
    state = {f"module.encoder_q.{k}": v for k, v in resnet.items()}
    state.update({f"module.encoder_k.{k}": torch.zeros(1) for k in resnet})  # left out anyway
    state.update({"module.queue": torch.randn(128, 8), "module.queue_ptr": torch.zeros(1).long()})
    ckpt = str(tmp_path / "moco_v1_200ep_pretrain.pth.tar")
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": state}, ckpt)
    out = str(tmp_path / "transfer")
    opts = tiny_finetune(2)
    assert (
        _eval_transfer().main(
            ["run", ckpt, "--benchmark", "demo_voc_c4", "--trials", "1", "--output-dir", out, *opts]
        )
        == 0
    )
    with open(os.path.join(out, "results.json")) as f:
        result = json.load(f)["demo_voc_c4"]
    assert result["weights"].endswith("_moco_v1_200ep_pretrain_c4.pkl")
    with open(result["weights"], "rb") as f:
        data = pickle.load(f)
    assert data["source_format"].startswith("MoCo v1 checkpoint")
    assert torch.equal(
        torch.as_tensor(data["model"]["roi_heads.res5.2.conv3.weight"]),
        resnet["layer4.2.conv3.weight"],
    )


@pytest.mark.slow
def test_random_init_on_two_processes(tmp_path):
    """The no-pretraining baseline, fine-tuned under launch with 2 processes (gloo on CPU:
    DDP without a device id)."""
    out = str(tmp_path / "two")
    opts = ["SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "(1,)"]
    results = run_benchmarks(
        "random", [BENCHMARKS["demo_voc_c4"]], out, trials=1, opts=opts, launch=Launch(num_gpus=2)
    )
    r = results["demo_voc_c4"]
    assert r["weights"] == "random" and len(r["trials"]) == 1
    assert r["trials"][0]["world_size"] == 2
    cfg = yaml.safe_load(open(os.path.join(out, "demo_voc_c4", "trial0", "config.yaml")))
    assert cfg["MODEL"]["WEIGHTS"] == ""
    assert "| demo_voc_c4 | random | 1 |" in open(os.path.join(out, "results.md")).read()


@pytest.mark.slow
def test_unreadable_annotations_are_a_clear_error(moco_checkpoint, tmp_path, capsys):
    root = str(tmp_path / "demo_det")
    demo_det.ensure_demo_det(root)
    xml = os.path.join(root, "Annotations", "000001.xml")
    with open(xml, "w") as f:
        f.write("<annotation><object>")  # truncated
    demo_det.register_demo_det(root, prefix="corrupt_demo_det")
    try:
        code = _eval_transfer().main(
            [
                "run",
                moco_checkpoint,
                "--benchmark",
                "demo_voc_c4",
                "--output-dir",
                str(tmp_path / "o"),
                "DATASETS.TRAIN",
                "('corrupt_demo_det_voc_train',)",
                "DATASETS.TEST",
                "('corrupt_demo_det_voc_val',)",
            ]
        )
        assert code == 2
        err = capsys.readouterr().err
        assert "Cannot read the annotations of dataset 'corrupt_demo_det_voc_train'" in err
        assert root in err and "ParseError" in err
        assert not os.path.isdir(str(tmp_path / "o" / "demo_voc_c4"))  # nothing launched
    finally:
        for split in demo_det.DEMO_DET_SPLITS:
            for fmt in demo_det.DEMO_DET_FORMATS:
                DatasetCatalog.remove(f"corrupt_demo_det_{fmt}_{split}")
                MetadataCatalog.remove(f"corrupt_demo_det_{fmt}_{split}")


@pytest.mark.slow
def test_trial_started_with_another_config_is_not_resumed(tmp_path):
    """A trial rerun with another schedule resumed the old schedule's checkpoint and reported it.
    Now that is an error naming the differences, and nothing in the trial folder changes."""
    out = str(tmp_path / "transfer")
    bench = [BENCHMARKS["demo_voc_c4"]]
    first = TINY + ["SOLVER.CHECKPOINT_PERIOD", "2"]
    shorter = first[:1] + ["2"] + first[2:3] + ["(1,)"] + first[4:]  # MAX_ITER 2, STEPS (1,)
    changed = r"SOLVER\.MAX_ITER 4 -> 2; SOLVER\.STEPS \[3\] -> \[1\]"
    run_benchmarks(RANDOM_INIT, bench, out, trials=1, opts=first)
    trial = os.path.join(out, "demo_voc_c4", "trial0")
    # A finished trial's result is not reported under another config.
    with pytest.raises(TransferError, match=changed):
        run_benchmarks(RANDOM_INIT, bench, out, trials=1, opts=shorter)
    # An unfinished one (killed before the end) is not resumed under another config.
    os.remove(os.path.join(trial, "results.json"))
    saved = {f: os.path.getmtime(os.path.join(trial, f)) for f in os.listdir(trial)}
    with pytest.raises(TransferError, match=changed + ".*--force"):
        run_benchmarks(RANDOM_INIT, bench, out, trials=1, opts=shorter)
    assert {f: os.path.getmtime(os.path.join(trial, f)) for f in os.listdir(trial)} == saved
    # The same config, with another checkpoint period, resumes.
    opts = first[:-1] + ["5"]
    again = run_benchmarks(RANDOM_INIT, bench, out, trials=1, opts=opts)
    assert again["demo_voc_c4"]["trials"][0]["max_iter"] == 4


def test_trial_weights_content_is_compared(tmp_path):
    trial = str(tmp_path / "trial0")
    cfg = load_transfer_config(BENCHMARKS["demo_voc_c4"].config).dump()
    # Keys that do not change what a trial computes may differ.
    faster = cfg.replace("NUM_WORKERS: 0", "NUM_WORKERS: 4").replace("DEVICE: cpu", "DEVICE: cuda")
    assert faster != cfg and config_differences(cfg, faster) == []
    assert config_differences(cfg, cfg.replace("BASE_LR: 0.005", "BASE_LR: 0.01")) == [
        "SOLVER.BASE_LR 0.005 -> 0.01"
    ]
    assert prepare_trial_dir(trial, cfg, "a" * 64, force=False) == "new"
    assert prepare_trial_dir(trial, cfg, "a" * 64, force=False) == "resume"
    # Other weights, nothing saved yet: starts again.
    assert prepare_trial_dir(trial, cfg, "b" * 64, force=False) == "new"
    open(os.path.join(trial, "model_0000009.pth"), "wb").close()
    with pytest.raises(ValueError, match="weights content"):
        prepare_trial_dir(trial, cfg, "c" * 64, force=False)
    # The weights file may move (another output folder): its content is what counts.
    moved = cfg.replace("WEIGHTS: ''", "WEIGHTS: /elsewhere/w.pkl")
    assert moved != cfg and prepare_trial_dir(trial, moved, "b" * 64, force=False) == "resume"
    # --force starts it again, keeping the old folder beside it.
    assert prepare_trial_dir(trial, cfg, "c" * 64, force=True) == "new"
    assert sorted(os.listdir(trial)) == ["config.yaml", "inputs.json"]
    kept = glob.glob(trial + ".replaced-*")
    assert len(kept) == 1 and "model_0000009.pth" in os.listdir(kept[0])
