"""Readouts end to end on a tiny generated ``demo_cls`` (CPU): the generated set, loading our
checkpoints and converted .pkl files into the readout network, ``eval_readout.py`` for every
protocol (one and two processes), clear errors, attention maps."""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from conftest import PROJECT_DIR, load_config
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from PIL import Image

from insloc_detco.readout import demo_cls
from insloc_detco.readout.attention import attention_maps, save_attention_figure
from insloc_detco.readout.encoder import ReadoutError, build_readout_encoder
from insloc_detco.transfer.converter import convert_checkpoint, save_model_zoo_pkl

SPLITS = {"train": 48, "val": 24}
SIZE = 64


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(PROJECT_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_cls(module_folder):
    root = str(module_folder("datasets") / "demo_cls")
    demo_cls.register_demo_cls(root, prefix="t_demo_cls", splits=SPLITS, size=SIZE)
    yield root
    for split in SPLITS:
        DatasetCatalog.remove(f"t_demo_cls_{split}")
        MetadataCatalog.remove(f"t_demo_cls_{split}")


def _checkpoint(out: str, config: str, images):
    """A pretraining checkpoint whose BN statistics are those of ``images`` (as after
    training: they must load too, and they keep the features well conditioned)."""
    cfg = load_config(config, "MODEL.DEVICE", "cpu")
    torch.manual_seed(0)
    model = build_model(cfg)
    bns = [m for m in model.encoder_q.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    with torch.no_grad():
        x = model.preprocess(list(images))
        if hasattr(model.encoder_q, "box_head"):  # InsLoc-FPN: the whole image as the box
            model.encoder_q(x, torch.tensor([[0.0, 0.0, x.shape[-1], x.shape[-2]]] * len(x)))
        else:
            model.encoder_q.backbone(x)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    DetectionCheckpointer(model, save_dir=out).save("model_final", iteration=3)
    return os.path.join(out, "model_final.pth"), model.eval()


def _images(n: int = 16):
    from insloc_detco.data.reading import read_rgb_image

    return torch.stack(
        [read_rgb_image(r["file_name"]) for r in DatasetCatalog.get("t_demo_cls_train")[:n]]
    )


@pytest.fixture(scope="module")
def moco(tiny_cls, module_folder):
    out = str(module_folder("moco"))
    return _checkpoint(out, "instant_test/pretrain_moco_v2.yaml", _images())


@pytest.fixture(scope="module")
def insloc_fpn(tiny_cls, module_folder):
    out = str(module_folder("insloc_fpn"))
    return _checkpoint(out, "instant_test/pretrain_insloc_fpn.yaml", _images())


# ------------------------------------------------------------------------------------------
# The generated set
# ------------------------------------------------------------------------------------------
def test_demo_cls_is_deterministic_balanced_and_labelled(tiny_cls, tmp_path):
    train = DatasetCatalog.get("t_demo_cls_train")
    val = DatasetCatalog.get("t_demo_cls_val")
    assert len(train) == SPLITS["train"] and len(val) == SPLITS["val"]
    counts = np.bincount([r["label"] for r in train], minlength=len(demo_cls.DEMO_CLS_CLASSES))
    assert counts.tolist() == [SPLITS["train"] // 8] * 8
    for r in train + val:
        # Folder per class (ImageNet layout), the object box inside the image.
        assert (
            os.path.basename(os.path.dirname(r["file_name"]))
            == demo_cls.DEMO_CLS_CLASSES[r["label"]]
        )
        assert Image.open(r["file_name"]).size == (SIZE, SIZE)
        x0, y0, x1, y1 = r["bbox"]
        assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
        assert SIZE / 3 - 1 <= x1 - x0 <= 2 * SIZE / 3 + 1
    assert MetadataCatalog.get("t_demo_cls_train").image_size == SIZE
    # Same seed, same bytes.
    other = str(tmp_path / "again")
    demo_cls.ensure_demo_cls(other, SPLITS, SIZE)
    for r in train[:5]:
        rel = os.path.relpath(r["file_name"], tiny_cls)
        with open(r["file_name"], "rb") as a, open(os.path.join(other, rel), "rb") as b:
            assert a.read() == b.read()


def test_demo_cls_shapes_are_drawn_as_their_class():
    from PIL import ImageDraw

    masks = {}
    for cls in demo_cls.DEMO_CLS_CLASSES:
        m = Image.new("L", (60, 60), 0)
        demo_cls._draw_shape(ImageDraw.Draw(m), cls, 0, 0, 60)
        masks[cls] = np.asarray(m) > 0
    fill = {c: m.mean() for c, m in masks.items()}
    assert fill["square"] > 0.99 and 0.45 < fill["triangle"] < 0.55
    assert fill["circle"] == pytest.approx(np.pi / 4, abs=0.03)
    assert not masks["ring"][30, 30] and masks["circle"][30, 30]  # the hole
    assert not masks["cross"][2, 2] and masks["cross"][2, 30]
    assert len({m.tobytes() for m in masks.values()}) == len(masks)


# ------------------------------------------------------------------------------------------
# Weights into the readout network
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_readout_network_loads_our_checkpoints_and_pkls(moco, insloc_fpn, tmp_path):
    ckpt, model = moco
    q = model.encoder_q.backbone
    enc, report = build_readout_encoder(ckpt, "c4")
    x = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    assert report.random_init == [] and report.meta_architecture == "MoCoV2"
    torch.testing.assert_close(enc.backbone.res2[0].conv1.weight, q.res2[0].conv1.weight)
    assert q.res5[2].conv3.norm.running_mean.abs().sum() > 0  # not the init: it must load
    torch.testing.assert_close(
        enc.roi_heads["res5"][2].conv3.norm.running_mean, q.res5[2].conv3.norm.running_mean
    )
    # The same network computes the same pooled res5 as the pretrained query backbone.
    with torch.no_grad():
        expected = q(model.preprocess(list(x)))["res5"].mean(dim=(2, 3))
    torch.testing.assert_close(enc(x)["res5"], expected, rtol=1e-4, atol=1e-4)

    # fpn layout: ResNet from MoCo, FPN and box head left at random init (and said so).
    enc_fpn, report = build_readout_encoder(ckpt, "fpn")
    assert {"backbone.fpn_lateral2", "roi_heads.box_head"} <= set(report.random_init)
    torch.testing.assert_close(
        enc_fpn.backbone.bottom_up.res5[0].conv1.weight, q.res5[0].conv1.weight
    )

    # InsLoc-FPN into fpn: FPN and box head pretrained too.
    ckpt_fpn, model_fpn = insloc_fpn
    enc, report = build_readout_encoder(ckpt_fpn, "fpn")
    assert report.random_init == []
    torch.testing.assert_close(
        enc.roi_heads["box_head"].fc1.weight, model_fpn.encoder_q.box_head.fc1.weight
    )

    # A converted .pkl loads the same tensors; one of another layout is refused clearly.
    conversion, _ = convert_checkpoint(ckpt, "c4")
    pkl = str(tmp_path / "moco_c4.pkl")
    save_model_zoo_pkl(conversion, pkl)
    enc_pkl, _ = build_readout_encoder(pkl, "c4")
    torch.testing.assert_close(enc_pkl(x)["res5"], expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ReadoutError, match="converted for a 'c4' detector"):
        build_readout_encoder(pkl, "fpn")


def test_readout_network_refuses_bad_weights(moco, tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ReadoutError, match="Cannot read"):
        build_readout_encoder(str(garbage), "c4")
    # A checkpoint with a missing stage would leave part of the backbone random: refused.
    state = torch.load(moco[0], map_location="cpu", weights_only=True)
    state["model"] = {k: v for k, v in state["model"].items() if ".res3." not in k}
    partial = tmp_path / "partial" / "model_final.pth"
    partial.parent.mkdir()
    torch.save(state, partial)
    with pytest.raises(ReadoutError, match="res3"):
        build_readout_encoder(str(partial), "c4")
    # Random init is seeded.
    a, _ = build_readout_encoder("random", "c4", seed=3)
    b, _ = build_readout_encoder("random", "c4", seed=3)
    torch.testing.assert_close(a.backbone.stem.conv1.weight, b.backbone.stem.conv1.weight)


# ------------------------------------------------------------------------------------------
# eval_readout.py
# ------------------------------------------------------------------------------------------
TINY = [
    "--train",
    "t_demo_cls_train",
    "--val",
    "t_demo_cls_val",
    "--num-workers",
    "0",
    "--batch-size",
    "16",
]
SMALL_ROI = ["MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "4"]  # cheap cell features (detector: 14)
TINY_CLASSIFIER = [
    "--epochs",
    "5",
    "--classifier-batch-size",
    "16",
    "--milestones",
    "4",
    "--lr",
    "0.5",
    "--normalize",
    "standardize",
]


def _results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_eval_readout_every_protocol(tiny_cls, moco, tmp_path, capsys):
    ckpt = moco[0]
    main = _script("eval_readout").main
    out = str(tmp_path / "out")
    assert main(["knn", ckpt, "random", *TINY, "--k", "5,10", "--output-dir", out]) == 0
    assert main(["loc", ckpt, *TINY, *TINY_CLASSIFIER, "--output-dir", out, *SMALL_ROI]) == 0
    assert main(["linear", ckpt, *TINY, *TINY_CLASSIFIER, "--cached", "--output-dir", out]) == 0
    assert (
        main(["svm", ckpt, *TINY, "--stages", "res4,res5", "--costs", "0.1,1", "--output-dir", out])
        == 0
    )
    assert main(["views", ckpt, *TINY, "--output-dir", out]) == 0
    results = _results(out)
    by = {(r["protocol"], os.path.basename(r["weights"])): r for r in results.values()}
    assert set(by) == {
        ("knn", "model_final.pth"),
        ("knn", "random"),
        ("loc", "model_final.pth"),
        ("linear", "model_final.pth"),
        ("svm", "model_final.pth"),
        ("views", "model_final.pth"),
    }
    assert set(by["views", "model_final.pth"]["metrics"]) == {"top1_res4", "top1_res5"}
    assert set(by["knn", "random"]["metrics"]) == {"top1@k5", "top5@k5", "top1@k10", "top5@k10"}
    assert set(by["loc", "model_final.pth"]["metrics"]) == {"Loc", "ObjLoc", "Cls"}
    assert set(by["svm", "model_final.pth"]["metrics"]) == {
        "mAP_res4",
        "mAP11_res4",
        "mAP_res5",
        "mAP11_res5",
    }
    for r in results.values():
        assert r["num_train"] == SPLITS["train"] and r["num_val"] == SPLITS["val"]
        assert all(0 <= v <= 100 for v in r["metrics"].values())
    assert "random initialisation" in by["knn", "random"]["weights_loaded"]
    with open(os.path.join(out, "results.md")) as f:
        md = f.read()
    for section in ("### knn", "### linear", "### loc", "### svm", "### views"):
        assert section in md
    # SVM: the all-point mAP first, the 11-point one beside it, labelled; loc's Cls labelled.
    assert "| res4 mAP | res5 mAP | res4 mAP11 | res5 mAP11 |" in md and "all-point" in md
    assert "| Loc | ObjLoc | Cls (cached) |" in md and "MoCo's augmented linear protocol" in md
    # One comparison table: a row per weights file, chance levels (8 classes, 9 cells) last.
    capsys.readouterr()
    assert main(["table", out]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0] == (
        "| weights | Views res4 | Views res5 | kNN | Cls (cached) | linear | Loc | ObjLoc |"
    )
    # chance: 1 / 24 validation images, 1 / 8 classes, 1 / 9 cells
    assert table[-1] == "| (chance) | 4.2 | 4.2 | 12.5 | 12.5 | 12.5 | 11.1 | 11.1 |"
    assert any(line.startswith("| random init | ") for line in table)
    assert main(["table", str(tmp_path / "nothing")]) == 2
    # Default output folder: readout/ next to the checkpoint.
    assert main(["knn", ckpt, *TINY, "--k", "5", "--max-train-images", "16"]) == 0
    assert os.path.isfile(os.path.join(os.path.dirname(ckpt), "readout", "results.md"))


@pytest.mark.slow
def test_linear_protocol_with_augmentation_resumes(tiny_cls, moco, tmp_path):
    main = _script("eval_readout").main
    out = str(tmp_path / "lin")
    args = [
        "linear",
        moco[0],
        *TINY,
        "--epochs",
        "2",
        "--classifier-batch-size",
        "16",
        "--milestones",
        "1",
        "--lr",
        "0.001",
        "--output-dir",
        out,
    ]
    assert main(args) == 0
    ckpt = torch.load(os.path.join(out, "linear_checkpoint.pth"), weights_only=True)
    assert ckpt["epoch"] == 2
    first = next(iter(_results(out).values()))["metrics"]
    assert main(args) == 0  # resumes at epoch 2: nothing left to train, same classifier
    assert next(iter(_results(out).values()))["metrics"] == first


@pytest.mark.slow
def test_eval_readout_two_processes_match_one(tiny_cls, moco, tmp_path):
    main = _script("eval_readout").main
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = ["knn", moco[0], *TINY, "--k", "5,10"]
    assert main([*args, "--output-dir", one]) == 0
    assert main([*args, "--output-dir", two, "--num-gpus", "2"]) == 0
    r1, r2 = next(iter(_results(one).values())), next(iter(_results(two).values()))
    assert r2["world_size"] == 2
    assert r1["metrics"] == pytest.approx(r2["metrics"])


def test_eval_readout_clear_errors(tiny_cls, moco, tmp_path, capsys, monkeypatch):
    main = _script("eval_readout").main
    out = ["--output-dir", str(tmp_path)]
    # Missing data: the ImageNet folder is not under $DETECTRON2_DATASETS here.
    from insloc_detco.readout.datasets import register_class_folder

    register_class_folder("t_missing_imagenet", str(tmp_path / "no" / "imagenet" / "train"))
    assert (
        main(["knn", moco[0], "--train", "t_missing_imagenet", "--val", "t_demo_cls_val", *out])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert main(["knn", moco[0], "--train", "pretrain_demo", "--val", "t_demo_cls_val", *out]) == 2
    assert "no labels" in capsys.readouterr().err
    assert main(["knn", moco[0], "--train", "no_such_set", "--val", "t_demo_cls_val", *out]) == 2
    assert "not registered" in capsys.readouterr().err
    assert main(["knn", str(tmp_path / "nope.pth"), *TINY, *out]) == 2
    assert "do not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"\x80\x04junk")
    assert main(["knn", str(bad), *TINY, *out]) == 2
    assert "bad.pkl" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(str(tmp_path), "results.json"))  # nothing half-written


# ------------------------------------------------------------------------------------------
# Attention maps
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_attention_maps_and_script(tiny_cls, moco, tmp_path):
    enc, _ = build_readout_encoder(moco[0], "c4")
    image = torch.randint(0, 255, (3, 64, 80), dtype=torch.uint8)
    maps = attention_maps(enc, image)
    assert list(maps) == ["res2", "res3", "res4", "res5"]
    for m in maps.values():
        assert m.shape == (64, 80) and m.min() == 0 and m.max() == pytest.approx(1.0)
    png = str(tmp_path / "a.png")
    save_attention_figure(image, [("a", maps), ("b", maps)], png)
    assert Image.open(png).size[0] > Image.open(png).size[1]  # 5 columns, 2 rows

    main = _script("visualize_attention").main
    out = str(tmp_path / "att")
    assert (
        main(
            [
                moco[0],
                "random",
                "--dataset",
                "t_demo_cls_val",
                "--num-images",
                "2",
                "--output-dir",
                out,
            ]
        )
        == 0
    )
    assert len(os.listdir(out)) == 2
    assert main(["random", "--output-dir", out]) == 2  # no images given


@pytest.mark.slow
def test_precise_bn_reestimates_statistics_on_readout_images(tiny_cls):
    from insloc_detco.readout.features import eval_transform, image_batches

    enc, _ = build_readout_encoder("random", "c4")
    stem_bn = enc.backbone.stem.conv1.norm
    assert stem_bn.running_mean.abs().sum() == 0  # init: identity statistics
    records = DatasetCatalog.get("t_demo_cls_train")[:32]
    batches = list(image_batches(records, eval_transform(SIZE, SIZE), 16))
    enc.recompute_bn_statistics(batches)
    c1 = enc.backbone.stem.conv1  # detectron2's Conv2d applies its norm: convolve without it
    with torch.no_grad():
        conv = torch.cat(
            [
                torch.nn.functional.conv2d(
                    enc.preprocess(b), c1.weight, c1.bias, c1.stride, c1.padding
                )
                for b in batches
            ]
        )
    # The stem's BN now holds the mean of its input over the images (weights untouched).
    torch.testing.assert_close(stem_bn.running_mean, conv.mean(dim=(0, 2, 3)), rtol=1e-3, atol=1e-3)
    assert not enc.training and not stem_bn.training
    # The fpn layout re-estimates the FPN and box-head statistics too (boxes given).
    enc_fpn, _ = build_readout_encoder("random", "fpn")
    enc_fpn.recompute_bn_statistics(batches, boxes=torch.tensor([[0.0, 0.0, 32.0, 32.0]]))
    assert enc_fpn.roi_heads["box_head"].conv1.norm.running_mean.abs().sum() > 0
    assert enc_fpn.backbone.fpn_lateral2.norm.running_mean.abs().sum() > 0
