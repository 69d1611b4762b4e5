"""The weight converter: every pretraining config's checkpoint lands in its detectron2 detector.

For each instant-test pretraining config a checkpoint is written the way training writes it
(``DetectionCheckpointer`` + ``config.yaml``), with randomised BN statistics and a key encoder
that differs from the query encoder, so that a wrong mapping cannot go unnoticed. It is
converted for each detector layout it can serve, loaded into the detector built from the
matching instant transfer config with ``DetectionCheckpointer``, and compared:
zero missing keys in the transferred groups, zero shape mismatches, identical features.
The default (layout-neutral) conversion of a backbone-only checkpoint must load completely into
stock model-zoo C4, FPN and RetinaNet detectors, and no write may destroy a file.
"""

import os
import pickle
import re

import numpy as np
import pytest
import torch
from conftest import PROJECT_DIR, load_config
from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from torch import nn

from insloc_detco.checkpoint import SafeDetectionCheckpointer
from insloc_detco.transfer import load_transfer_config
from insloc_detco.transfer.converter import (
    ConversionError,
    convert_checkpoint,
    convert_state_dict,
    detector_resnet_keys,
    load_pretrain_checkpoint,
    save_model_zoo_pkl,
)

PRETRAIN_CONFIGS = {
    "MoCoV2": "instant_test/pretrain_moco_v2.yaml",
    "DetCo": "instant_test/pretrain_detco.yaml",
    "InsLocC4": "instant_test/pretrain_insloc_c4.yaml",
    "InsLocFPN": "instant_test/pretrain_insloc_fpn.yaml",
}
DETECTORS = {
    "c4": "instant_test/voc_faster_rcnn_R_50_C4.yaml",
    "fpn": "instant_test/coco_mask_rcnn_R_50_FPN.yaml",
    "retinanet": "instant_test/coco_retinanet_R_50_FPN_semi.yaml",
}
CASES = [
    ("MoCoV2", "c4"),
    ("MoCoV2", "fpn"),
    ("MoCoV2", "retinanet"),
    ("DetCo", "c4"),
    ("DetCo", "fpn"),
    ("InsLocC4", "c4"),
    ("InsLocFPN", "fpn"),
    ("InsLocFPN", "c4"),
    ("InsLocFPN", "retinanet"),
]


def _randomise(model: nn.Module, seed: int):
    """BN statistics / affine and every key-encoder tensor moved away from their init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
        for p in model.encoder_k.parameters():
            p.add_(torch.randn(p.shape, generator=g))


_CACHE = {}


@pytest.fixture(scope="module")
def pretrained(module_folder):
    """meta-arch -> (checkpoint path, pretraining model in eval mode); built on first use."""

    def get(meta_arch):
        if meta_arch not in _CACHE:
            name = PRETRAIN_CONFIGS[meta_arch]
            if not os.path.isfile(os.path.join(PROJECT_DIR, "configs", name)):
                pytest.skip(f"configs/{name} is not there yet")
            cfg = load_config(name, "MODEL.DEVICE", "cpu")
            torch.manual_seed(0)
            model = build_model(cfg)
            _randomise(model, seed=1)
            out = str(module_folder(meta_arch))
            with open(os.path.join(out, "config.yaml"), "w") as f:
                f.write(cfg.dump())
            DetectionCheckpointer(model, save_dir=out).save("model_final", iteration=9)
            _CACHE[meta_arch] = (os.path.join(out, "model_final.pth"), model.eval())
        return _CACHE[meta_arch]

    yield get
    _CACHE.clear()


def _stages(resnet, x):
    """res2..res5 (those present) of a detectron2 ResNet, stage by stage."""
    out, x = {}, resnet.stem(x)
    for name in ("res2", "res3", "res4", "res5"):
        if hasattr(resnet, name):
            x = out[name] = getattr(resnet, name)(x)
    return out


def _pretrain_res5(model):
    return (
        model.encoder_q.res5 if hasattr(model.encoder_q, "res5") else model.encoder_q.backbone.res5
    )


def _pretrain_resnet(model):
    backbone = model.encoder_q.backbone
    return backbone.bottom_up if hasattr(backbone, "bottom_up") else backbone


def _transferred_groups(target, has_fpn):
    """Prefixes of the detector's keys that the conversion must fill completely."""
    if target == "c4":
        return ("backbone.", "roi_heads.res5.0.", "roi_heads.res5.1.", "roi_heads.res5.2.")
    groups = ("backbone.bottom_up.",) + (("backbone.fpn_",) if has_fpn else ())
    if target == "fpn" and has_fpn:
        groups += tuple(f"roi_heads.box_head.conv{i}." for i in range(1, 5))
        groups += ("roi_heads.box_head.fc1.",)
    return groups


def _assert_same(a, b, what):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("meta_arch,target", CASES)
def test_conversion_loads_into_detector(pretrained, tmp_path, meta_arch, target):
    ckpt, model = pretrained(meta_arch)
    conversion, info = convert_checkpoint(ckpt, target)
    assert info["meta_architecture"] == meta_arch and info["iteration"] == 9
    pkl = str(tmp_path / "model.pkl")
    save_model_zoo_pkl(conversion, pkl, source=ckpt)

    with open(pkl, "rb") as f:
        data = pickle.load(f)
    assert data["__author__"] and data["matching_heuristics"] is True
    assert all(isinstance(v, np.ndarray) for v in data["model"].values())
    assert not any(k.startswith(("encoder_", "queue")) for k in data["model"])

    cfg = load_transfer_config(DETECTORS[target])
    torch.manual_seed(1)
    detector = build_model(cfg).eval()
    DetectionCheckpointer(detector).load(pkl)
    state = detector.state_dict()

    # No shape mismatch, nothing unexpected: every written tensor is in the detector, loaded.
    for k, v in data["model"].items():
        assert k in state, f"{k} is not a key of the {target} detector"
        assert tuple(state[k].shape) == v.shape, k
        assert torch.equal(state[k], torch.as_tensor(v)), f"{k} was not loaded"
    # No missing key in the transferred groups.
    has_fpn = meta_arch == "InsLocFPN"
    groups = _transferred_groups(target, has_fpn)
    missing = [k for k in state if k.startswith(groups) and k not in data["model"]]
    assert not missing, f"missing in the transferred groups: {missing[:5]}"

    # Identical features before / after (eval mode, same input).
    torch.manual_seed(2)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = _stages(_pretrain_resnet(model), x)
        if "res5" not in ref:  # InsLoc-C4: res5 is the pretext RoI head
            ref["res5"] = _pretrain_res5(model)(ref["res4"])
        if target == "c4":
            _assert_same(detector.backbone(x)["res4"], ref["res4"], "res4")
            res5 = detector.roi_heads.res5
            assert isinstance(res5[-1], nn.BatchNorm2d)  # the extra norm, not pretrained
            _assert_same(res5[:-1](ref["res4"]), ref["res5"], "roi_heads.res5")
        else:
            got = detector.backbone.bottom_up(x)
            for name in got:
                _assert_same(got[name], ref[name], f"bottom_up.{name}")
        if has_fpn and target != "c4":
            ref_p = model.encoder_q.backbone(x)
            got_p = detector.backbone(x)
            levels = ("p2", "p3", "p4", "p5") if target == "fpn" else ("p3", "p4", "p5")
            for p in levels:
                _assert_same(got_p[p], ref_p[p], p)
        if has_fpn and target == "fpn":
            z = torch.randn(3, 256, 7, 7)
            y = z
            for name, layer in detector.roi_heads.box_head.named_children():
                y = layer(y)
                if name == "fc_relu1":  # the rest (fc_norm) is new
                    break
            _assert_same(y, model.encoder_q.box_head(z), "box_head")


def test_report_lists_written_and_left_out(pretrained):
    ckpt, _ = pretrained("MoCoV2")
    conversion, _ = convert_checkpoint(ckpt, "c4")
    table = conversion.table()
    assert "InsLocDetCo MoCoV2 pretraining checkpoint" in table
    assert "encoder_q.backbone.res5.*" in table and "roi_heads.res5.*" in table
    left = {prefix: reason for prefix, _, reason in conversion.left_out}
    assert left["encoder_k."] == "key (momentum) encoder"
    assert left["queue"] == "negative-key queue"
    assert left["encoder_q.head."] == "projection / embedding head"
    # Every tensor of the checkpoint is accounted for, exactly once.
    sd, _ = load_pretrain_checkpoint(ckpt)
    assert len(conversion.model) + sum(n for _, n, _ in conversion.left_out) == len(sd)


def test_insloc_fpn_extra_fcs_left_out(pretrained):
    ckpt, _ = pretrained("InsLocFPN")
    conversion, _ = convert_checkpoint(ckpt, "fpn")
    assert not any("embed" in k or "fc2" in k for k in conversion.model)
    assert any(reason == "projection / embedding head" for _, _, reason in conversion.left_out)


def _moco_like_state():
    """A minimal MoCo-layout state dict: tiny tensors, real detectron2 ResNet names."""
    sd = {}
    for stage in ("stem", "res2", "res3", "res4", "res5"):
        name = "stem.conv1.weight" if stage == "stem" else f"{stage}.0.conv1.weight"
        sd[f"encoder_q.backbone.{name}"] = torch.ones(1)
        sd[f"encoder_k.backbone.{name}"] = torch.zeros(1)
    sd["encoder_q.head.mlp.0.weight"] = torch.ones(1)
    sd["queue.keys"] = torch.zeros(4, 2)
    return sd


def test_refuses_what_it_does_not_recognise():
    sd = _moco_like_state()
    # nothing at all
    with pytest.raises(ConversionError, match="Unrecognised weights: 0 tensors"):
        convert_state_dict({}, "c4")
    # a query encoder of no known layout, and no config.yaml to say what it is
    with pytest.raises(ConversionError, match="Unrecognised query-encoder layout"):
        convert_state_dict({"encoder_q.trunk.conv1.weight": torch.ones(1)}, "c4")
    # an unknown meta-architecture
    with pytest.raises(ConversionError, match="Don't know how to convert"):
        convert_state_dict(sd, "c4", "SimCLR")
    # an unknown target
    with pytest.raises(ConversionError, match="Unknown target"):
        convert_state_dict(sd, "dilated", "MoCoV2")
    # a partial ResNet would leave a stage randomly initialised in the detector
    partial = {k: v for k, v in sd.items() if ".res3." not in k}
    with pytest.raises(ConversionError, match=r"lacks ResNet stage\(s\) \['res3'\]"):
        convert_state_dict(partial, "c4", "MoCoV2")
    # the config says InsLoc-FPN, the tensors say otherwise
    with pytest.raises(ConversionError, match="no FPN and box-head"):
        convert_state_dict(sd, "fpn", "InsLocFPN")
    # a tensor that is no part of a detectron2 ResNet
    with pytest.raises(ConversionError, match="encoder_q.backbone.res2.0.se.weight"):
        convert_state_dict({**sd, "encoder_q.backbone.res2.0.se.weight": torch.ones(1)}, "c4")


def test_ddp_prefix_and_layout_inference():
    sd = {"module." + k: v for k, v in _moco_like_state().items()}
    conversion = convert_state_dict(sd, "c4")  # no meta-architecture: inferred from the keys
    assert conversion.meta_architecture == "MoCoV2"
    assert set(conversion.model) == {
        "backbone.stem.conv1.weight",
        "backbone.res2.0.conv1.weight",
        "backbone.res3.0.conv1.weight",
        "backbone.res4.0.conv1.weight",
        "roi_heads.res5.0.conv1.weight",
    }
    assert all(torch.equal(v, torch.ones(1)) for v in conversion.model.values())  # query, not key
    assert "module.encoder_k." in {p for p, _, _ in conversion.left_out}  # reported as stored
    assert convert_state_dict(sd, "auto").target == "any"  # backbone only: layout-neutral


def test_unreadable_files(tmp_path):
    bad = tmp_path / "model_final.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="Cannot read"):
        load_pretrain_checkpoint(str(bad))
    with pytest.raises(ConversionError, match="does not exist"):
        load_pretrain_checkpoint(str(tmp_path / "missing.pth"))
    empty = tmp_path / "model.pkl"
    empty.write_bytes(b"")
    with pytest.raises(ConversionError, match="is empty"):
        load_pretrain_checkpoint(str(empty))


# ------------------------------------------------------------------------------------------
# Backbone-only conversions load everywhere (layout-neutral names)
# ------------------------------------------------------------------------------------------
STOCK_CONFIGS = [
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
    "COCO-InstanceSegmentation/mask_rcnn_R_50_C4_1x.yaml",
    "COCO-Detection/retinanet_R_50_FPN_1x.yaml",
]


@pytest.mark.parametrize("meta_arch", ["MoCoV2", "DetCo"])
def test_default_conversion_loads_into_stock_detectors(pretrained, tmp_path, meta_arch):
    """The default target of a backbone-only source writes layout-neutral ResNet names that
    detectron2's matching heuristics place in stock C4, FPN and RetinaNet detectors: no
    backbone tensor is left missing (issue: 265 of 265 were, in an FPN detector)."""
    ckpt, model = pretrained(meta_arch)
    conversion, _ = convert_checkpoint(ckpt, "auto")
    assert conversion.target == "any"
    pkl = str(tmp_path / "backbone.pkl")
    save_model_zoo_pkl(conversion, pkl, source=ckpt)
    resnet = model.encoder_q.backbone.state_dict()
    for name in STOCK_CONFIGS:
        cfg = model_zoo.get_config(name)
        cfg.MODEL.DEVICE = "cpu"
        detector = build_model(cfg)
        checkpointer = SafeDetectionCheckpointer(detector)
        incompatible = checkpointer._load_model(checkpointer._load_file(pkl))
        backbone = detector_resnet_keys(detector.state_dict())
        assert len(backbone) == 265
        assert not [k for k in incompatible.missing_keys if k in backbone], name
        assert not incompatible.incorrect_shapes
        state = detector.state_dict()
        for k in backbone:  # the values are the pretrained ones
            in_resnet = re.sub(r"^(backbone\.(bottom_up\.)?|roi_heads\.)", "", k)
            assert torch.equal(state[k], resnet[in_resnet]), (name, k)


# ------------------------------------------------------------------------------------------
# Never destroy a file
# ------------------------------------------------------------------------------------------
def test_output_never_replaces_the_input_or_foreign_files(pretrained, tmp_path):
    ckpt, _ = pretrained("MoCoV2")
    conversion, _ = convert_checkpoint(ckpt, "any")
    # the input itself (also through another path to it)
    link = tmp_path / "link.pth"
    link.symlink_to(ckpt)
    before = open(ckpt, "rb").read()
    for out in (ckpt, str(link)):
        with pytest.raises(ConversionError, match="is the input checkpoint"):
            save_model_zoo_pkl(conversion, out, source=ckpt)
    assert open(ckpt, "rb").read() == before
    # a file that is not a conversion of ours
    foreign = tmp_path / "notes.pkl"
    foreign.write_bytes(pickle.dumps({"model": {"a": np.zeros(1)}, "__author__": "someone"}))
    with pytest.raises(ConversionError, match="not a conversion written by InsLocDetCo"):
        save_model_zoo_pkl(conversion, str(foreign), source=ckpt)
    assert pickle.loads(foreign.read_bytes())["__author__"] == "someone"
    # an earlier conversion is replaced; with force anything is
    ours = str(tmp_path / "ours.pkl")
    save_model_zoo_pkl(conversion, ours, source=ckpt)
    save_model_zoo_pkl(conversion, ours, source=ckpt)
    save_model_zoo_pkl(conversion, str(foreign), source=ckpt, force=True)
    assert pickle.loads(foreign.read_bytes())["__author__"] == "InsLocDetCo"
    # a folder, or a path under a file: one-line errors
    with pytest.raises(ConversionError, match="is a directory"):
        save_model_zoo_pkl(conversion, str(tmp_path), source=ckpt)
    with pytest.raises(ConversionError, match="is a file, not a folder"):
        save_model_zoo_pkl(conversion, str(foreign) + "/x.pkl", source=ckpt)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_failed_write_leaves_nothing_behind(pretrained, tmp_path, monkeypatch):
    ckpt, _ = pretrained("MoCoV2")
    conversion, _ = convert_checkpoint(ckpt, "any")
    out = str(tmp_path / "out.pkl")
    save_model_zoo_pkl(conversion, out, source=ckpt)
    before = open(out, "rb").read()

    def disk_full(obj, f, protocol=None):
        f.write(b"\x80\x04partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pickle, "dump", disk_full)
    with pytest.raises(ConversionError, match="Cannot write .*No space left on device"):
        save_model_zoo_pkl(conversion, out, source=ckpt)
    assert open(out, "rb").read() == before  # the earlier file is intact
    assert os.listdir(tmp_path) == ["out.pkl"]  # no .tmp
