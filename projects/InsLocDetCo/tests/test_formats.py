"""Third-party checkpoints in: each project's real naming is recognised and converted.

The fakes (``fake_checkpoints.py``) are written the way each project saves its checkpoints.
Every converted tensor must land under its detectron2 name with the source's value, and the
converted networks must compute what the source networks compute: torchvision's ResNet-50
against detectron2's ``ResNet`` (STRIDE_IN_1X1 False, eval mode), and InstanceLoc's mmcv FPN
neck and 4conv1fc head against detectron2's FPN and box head, through an independent functional
implementation of the mmcv modules.
"""

import fake_checkpoints
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model, build_resnet_backbone
from fake_checkpoints import BN_PARAMS, detectron2_name, no_fc

from insloc_detco.transfer import load_transfer_config
from insloc_detco.transfer.benchmarks import BENCHMARKS
from insloc_detco.transfer.converter import (
    ConversionError,
    convert_checkpoint,
    convert_state_dict,
    fit_to_detector,
    load_model_zoo_pkl,
)
from insloc_detco.transfer.runner import check_weights, detector_state, prepare_weights

FPN_DETECTOR = "instant_test/coco_mask_rcnn_R_50_FPN.yaml"  # InsLoc's protocol: 4conv1fc + BN
DETCO_FPN_DETECTOR = "instant_test/detco_coco_mask_rcnn_R_50_FPN.yaml"  # 2fc, no head norm
C4_DETECTOR = "instant_test/coco_mask_rcnn_R_50_C4.yaml"


@pytest.fixture(scope="module")
def torchvision_resnet():
    return fake_checkpoints.torchvision_resnet()


@pytest.fixture(scope="module")
def resnet_sd(torchvision_resnet):
    return {k: v.clone() for k, v in torchvision_resnet.state_dict().items()}


@pytest.fixture(scope="module")
def insloc_heads():
    return fake_checkpoints.insloc_heads()


@pytest.fixture(scope="module")
def fakes(module_folder, resnet_sd, insloc_heads):
    folder = str(module_folder("fakes"))
    return fake_checkpoints.write_fakes(folder, resnet_sd, insloc_heads)


# ------------------------------------------------------------------------------------------
# Names and values
# ------------------------------------------------------------------------------------------
BACKBONE_ONLY = {
    "moco_v2": "MoCo v2 checkpoint",
    "moco_v1": "MoCo v1 checkpoint",
    "torchvision": "torchvision-layout ResNet state dict",
    "densecl_raw": "DenseCL pretraining checkpoint",
    "densecl_released": "torchvision-layout ResNet in 'state_dict'",
    "detco_released": "torchvision-layout ResNet in 'state_dict'",
    "moco_converted": "detectron2 layout-neutral ResNet",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BACKBONE_ONLY))
def test_backbone_only_formats_write_the_source_resnet(fakes, resnet_sd, name):
    conversion, _ = convert_checkpoint(fakes[name], "auto")
    assert BACKBONE_ONLY[name] in conversion.source_format
    assert conversion.target == "any"  # layout-neutral: loads into every detector
    expected = {
        detectron2_name(k): v
        for k, v in resnet_sd.items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    assert set(conversion.model) == set(expected)
    for k, v in expected.items():
        assert torch.equal(torch.as_tensor(conversion.model[k]), v), k
    # Everything else is accounted for, with a reason.
    left = {prefix: reason for prefix, _, reason in conversion.left_out}
    if name.startswith("moco_v"):
        assert left["module.encoder_k."] == "key (momentum) encoder"
        assert left["module.queue"] == "negative-key queue"
        assert left["module.encoder_q.fc."].startswith("projection head")
    if name == "densecl_raw":
        assert left["encoder_q.1."] == "projection neck" and "queue" in left
        assert "registered twice" in left["backbone."]
    if name == "moco_converted":
        assert "stem.fc." in left


@pytest.mark.parametrize("target", ["c4", "fpn", "retinanet"])
def test_backbone_only_formats_for_each_layout(fakes, resnet_sd, target):
    conversion, _ = convert_checkpoint(fakes["moco_v2"], target)
    for k, v in resnet_sd.items():
        if k.startswith("fc."):
            continue
        name = detectron2_name(k)
        if target == "c4":
            dst = ("roi_heads." if name.startswith("res5.") else "backbone.") + name
        else:
            dst = "backbone.bottom_up." + name
        assert torch.equal(conversion.model[dst], v), dst
    assert len(conversion.model) == len(no_fc(resnet_sd))


def test_instance_loc_fpn_names(fakes, resnet_sd, insloc_heads):
    conversion, _ = convert_checkpoint(fakes["insloc_fpn"], "auto")
    assert conversion.target == "fpn" and conversion.meta_architecture == "InsLocFPN"
    assert "InstanceLoc (mmdetection) R50-FPN" in conversion.source_format
    model = conversion.model
    for k, v in no_fc(resnet_sd).items():
        assert torch.equal(model["backbone.bottom_up." + detectron2_name(k)], v)
    pairs = []  # (mmcv ConvModule, detectron2 Conv2d with norm)
    for i in range(4):
        pairs.append((f"neck.lateral_convs.{i}.", f"backbone.fpn_lateral{i + 2}."))
        pairs.append((f"neck.fpn_convs.{i}.", f"backbone.fpn_output{i + 2}."))
        pairs.append((f"roi_head.bbox_head.shared_convs.{i}.", f"roi_heads.box_head.conv{i + 1}."))
    for src, dst in pairs:
        assert torch.equal(model[dst + "weight"], insloc_heads[src + "conv.weight"]), dst
        assert dst + "bias" not in model  # normalised convs have no bias
        for p in BN_PARAMS:
            assert torch.equal(model[dst + "norm." + p], insloc_heads[src + "bn." + p]), dst
    for p in ("weight", "bias"):
        assert torch.equal(
            model[f"roi_heads.box_head.fc1.{p}"],
            insloc_heads[f"roi_head.bbox_head.shared_fcs.0.{p}"],
        )
    assert not any("fc2" in k or "_k." in k for k in model)
    left = {prefix: reason for prefix, _, reason in conversion.left_out}
    assert left["backbone_k."] == left["neck_k."] == left["roi_head_k."] == "key (momentum) encoder"
    assert left["roi_head.bbox_head.shared_fcs."] == "pretext fc layers after fc1"


def test_instance_loc_c4_names(fakes, resnet_sd):
    conversion, _ = convert_checkpoint(fakes["insloc_c4"], "auto")
    assert conversion.target == "c4" and conversion.meta_architecture == "InsLocC4"
    for k, v in no_fc(resnet_sd).items():
        name = detectron2_name(k)
        dst = ("roi_heads." if name.startswith("res5.") else "backbone.") + name
        assert torch.equal(conversion.model[dst], v), dst
    assert len(conversion.model) == len(no_fc(resnet_sd))


# ------------------------------------------------------------------------------------------
# Same network
# ------------------------------------------------------------------------------------------
def _detectron2_resnet():
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False  # torchvision / mmdetection: stride in the 3x3
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    return build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()


def _torchvision_stages(net, x):
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    out = {}
    for i, name in enumerate(("res2", "res3", "res4", "res5")):
        x = out[name] = getattr(net, f"layer{i + 1}")(x)
    return out


def _close(a, b, what):
    torch.testing.assert_close(
        a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item(), msg=lambda m: f"{what}: {m}"
    )


@pytest.mark.slow
def test_resnet_features_equal_torchvision(fakes, torchvision_resnet):
    """A converted torchvision-layout ResNet computes what torchvision's ResNet-50 computes."""
    conversion, _ = convert_checkpoint(fakes["densecl_released"], "any")
    resnet = _detectron2_resnet()
    missing, unexpected = resnet.load_state_dict(conversion.model, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, got = _torchvision_stages(torchvision_resnet, x), resnet(x)
    for name in ref:
        _close(got[name], ref[name], name)


def _bn(x, sd, prefix):
    return F.batch_norm(
        x,
        sd[prefix + "running_mean"],
        sd[prefix + "running_var"],
        sd[prefix + "weight"],
        sd[prefix + "bias"],
        False,
        0.0,
        1e-5,
    )


def _mmcv_fpn(features, sd):
    """mmdetection's FPN forward (laterals, nearest top-down sum, output convs), from its
    tensors: ConvModule = conv (no bias) -> BN, no activation in the neck."""
    lat = []
    for i, f in enumerate(features):
        conv = f"neck.lateral_convs.{i}."
        lat.append(_bn(F.conv2d(f, sd[conv + "conv.weight"]), sd, conv + "bn."))
    for i in range(len(lat) - 1, 0, -1):
        lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode="nearest")
    out = []
    for i, x in enumerate(lat):
        conv = f"neck.fpn_convs.{i}."
        out.append(_bn(F.conv2d(x, sd[conv + "conv.weight"], padding=1), sd, conv + "bn."))
    return out


def _mmcv_box_head(x, sd):
    """InstanceLoc's ConvFCBBoxInsClsHead up to the first fc: 4 x (conv, BN, ReLU), fc, ReLU."""
    head = "roi_head.bbox_head."
    for i in range(4):
        x = F.relu(
            _bn(
                F.conv2d(x, sd[f"{head}shared_convs.{i}.conv.weight"], padding=1),
                sd,
                f"{head}shared_convs.{i}.bn.",
            )
        )
    return F.relu(
        F.linear(x.flatten(1), sd[head + "shared_fcs.0.weight"], sd[head + "shared_fcs.0.bias"])
    )


def _detector(config):
    torch.manual_seed(4)
    cfg = load_transfer_config(config)
    return build_model(cfg).eval()


@pytest.mark.slow
def test_instance_loc_fpn_features_equal_mmdetection(fakes, torchvision_resnet, insloc_heads):
    """InstanceLoc's BN placement (mmcv ConvModule: conv -> bn) lands on detectron2's
    ``fpn_*.norm`` and ``box_head.conv*.norm``: same P2-P5 and box-head features."""
    detector = _detector(FPN_DETECTOR)
    conversion, _ = convert_checkpoint(fakes["insloc_fpn"], "fpn")
    conversion = fit_to_detector(conversion, detector.state_dict())
    missing, unexpected = detector.load_state_dict(conversion.model, strict=False)
    assert not unexpected
    assert not [k for k in missing if k.startswith(("backbone.", "roi_heads.box_head.conv"))]
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    z = torch.randn(3, 256, 7, 7, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        stages = _torchvision_stages(torchvision_resnet, x)
        ref = _mmcv_fpn([stages[f"res{i}"] for i in (2, 3, 4, 5)], insloc_heads)
        got = detector.backbone(x)
        for level, r in zip(("p2", "p3", "p4", "p5"), ref):
            _close(got[level], r, level)
        y = z
        for name, layer in detector.roi_heads.box_head.named_children():
            y = layer(y)
            if name == "fc_relu1":  # what follows (fc_norm) is the recipe's, not pretrained
                break
        _close(y, _mmcv_box_head(z, insloc_heads), "box head")


@pytest.mark.slow
def test_instance_loc_c4_res5_features(fakes, torchvision_resnet):
    detector = _detector(C4_DETECTOR)
    conversion, _ = convert_checkpoint(fakes["insloc_c4"], "c4")
    conversion = fit_to_detector(conversion, detector.state_dict())
    detector.load_state_dict(conversion.model, strict=False)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = _torchvision_stages(torchvision_resnet, x)
        _close(detector.backbone(x)["res4"], ref["res4"], "res4")
        _close(detector.roi_heads.res5[:-1](ref["res4"]), ref["res5"], "roi_heads.res5")


# ------------------------------------------------------------------------------------------
# Detectron2 detectors, and what does not fit
# ------------------------------------------------------------------------------------------
def test_detectron2_detector_checkpoint(tmp_path):
    """A trained detectron2 FPN detector (2fc head): ResNet, FPN and box head transfer into the
    same architecture; its task heads are left out; a 4conv1fc detector takes no box head."""
    source = _detector(DETCO_FPN_DETECTOR)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01)
    path = str(tmp_path / "model_final.pth")
    torch.save({"model": source.state_dict(), "iteration": 90000}, path)
    conversion, info = convert_checkpoint(path, "fpn")
    assert "detectron2 FPN / RetinaNet detector" in conversion.source_format
    assert info["iteration"] == 90000
    state = source.state_dict()
    same = fit_to_detector(conversion, _detector(DETCO_FPN_DETECTOR).state_dict())
    for k, v in same.model.items():
        assert torch.equal(v, state[k]), k
    transferred = ("backbone.", "roi_heads.box_head.")
    assert set(same.model) == {k for k in state if k.startswith(transferred)}
    left = {p: r for p, _, r in same.left_out}
    assert left["roi_heads.box_predictor."] == left["roi_heads.mask_head."] == "task-specific head"
    assert left["proposal_generator."] == "task-specific head (RPN)"

    other = fit_to_detector(conversion, _detector(FPN_DETECTOR).state_dict())
    assert not any(k.startswith("roi_heads.box_head.") for k in other.model)
    assert any(k.startswith("backbone.fpn_") for k in other.model)  # both FPNs have BN
    reasons = [r for p, _, r in other.left_out if p.startswith("roi_heads.box_head.")]
    assert reasons and "0 conv + 2 fc" in reasons[0] and "4 conv + 1 fc" in reasons[0]


def test_instance_loc_box_head_left_out_of_detco_protocol(fakes):
    detector_state = _detector(DETCO_FPN_DETECTOR).state_dict()
    conversion, _ = convert_checkpoint(fakes["insloc_fpn"], "fpn")
    fitted = fit_to_detector(conversion, detector_state)
    assert not any(k.startswith("roi_heads.box_head.") for k in fitted.model)
    assert sum(1 for k in fitted.model if k.startswith("backbone.fpn_")) == 8 * 6
    assert all(k in detector_state for k in fitted.model)


def test_resnet_that_does_not_fit_is_an_error(tmp_path):
    resnet18 = torchvision.models.resnet18().state_dict()
    conversion = convert_state_dict(resnet18, "fpn")  # converts: it is a ResNet
    with pytest.raises(ConversionError, match="ResNet does not fit this detector"):
        fit_to_detector(conversion, _detector(FPN_DETECTOR).state_dict())


def test_unrecognised_and_ambiguous_inputs(tmp_path, resnet_sd):
    backbone = no_fc(resnet_sd)
    cases = [
        (
            {"trunk.conv.weight": torch.ones(1), "head.fc.weight": torch.ones(1)},
            r"Unrecognised weights: 2 tensors named like trunk.conv.weight: 1, head.fc.weight",
        ),
        ({"encoder_q.trunk.conv1.weight": torch.ones(1)}, "Unrecognised query-encoder layout"),
        (
            {**{f"backbone.{k}": v for k, v in backbone.items()}, "neck.fpn.weight": torch.ones(1)},
            "not an InstanceLoc pretraining checkpoint",
        ),
        (
            {
                **{f"backbone.{k}": v for k, v in backbone.items()},
                **{detectron2_name(k): v + 1 for k, v in backbone.items()},
            },
            "Two different ResNets",
        ),
        ({"res2_0_branch2a_w": np.zeros(1), "conv1_w": np.zeros(1)}, "Caffe2"),
        ({**backbone, "layer1.0.se.fc1.weight": torch.ones(1)}, "layer1.0.se.fc1.weight"),
        (
            {k: v for k, v in backbone.items() if not k.startswith("layer3.")},
            r"lacks ResNet stage\(s\) \['res4'\]",
        ),
    ]
    for state_dict, message in cases:
        with pytest.raises(ConversionError, match=message):
            convert_state_dict(state_dict, "fpn")
    for obj, message in (
        ([1, 2], "holds a list"),
        ({"epoch": 3, "arch": "resnet50"}, "holds no tensors: a dict with epoch"),
    ):
        path = tmp_path / "weird.pth"
        torch.save(obj, path)
        with pytest.raises(ConversionError, match=message):
            convert_checkpoint(str(path), "auto")


def test_instance_loc_neck_with_another_norm_is_an_error(resnet_sd, insloc_heads):
    sd = {f"backbone.{k}": v for k, v in no_fc(resnet_sd).items()}
    sd.update({k.replace(".bn.", ".gn."): v for k, v in insloc_heads.items()})
    sd["backbone_k.conv1.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match="neck.lateral_convs.0.gn.weight"):
        convert_state_dict(sd, "fpn")


@pytest.mark.slow
def test_run_places_third_party_weights_for_each_benchmark(fakes, tmp_path):
    """What `eval_transfer.py run` does per benchmark: convert for the benchmark's detector,
    keep what it uses, and check that every written tensor loads with the ResNet complete."""
    expected = {  # benchmark -> (groups written, file name suffix)
        "demo_coco_fpn": ({"bottom_up", "fpn", "box_head"}, "_fpn.pkl"),
        "demo_detco_coco_fpn": ({"bottom_up", "fpn"}, "_fpn_no-box_head.pkl"),
        "demo_coco_c4": ({"backbone", "res5"}, "_c4.pkl"),
        "demo_semi_retinanet": ({"bottom_up", "fpn"}, "_retinanet.pkl"),
    }
    for name, (groups, suffix) in expected.items():
        cfg = load_transfer_config(BENCHMARKS[name].config)
        state = detector_state(cfg)
        pkl = prepare_weights(fakes["insloc_fpn"], cfg, str(tmp_path), state)
        assert pkl.endswith(suffix), pkl
        report = check_weights(cfg, pkl, state)
        written = load_model_zoo_pkl(pkl)["model"]
        found = {_group(k) for k in written}
        assert found == groups, (name, found)
        assert report["loaded"] == len(written)
        if name == "demo_semi_retinanet":  # RetinaNet's FPN starts at P3
            assert not any("fpn_lateral2" in k or "fpn_output2" in k for k in written)


def _group(key):
    if key.startswith("backbone.bottom_up."):
        return "bottom_up"
    if key.startswith("backbone.fpn_"):
        return "fpn"
    if key.startswith("roi_heads.box_head."):
        return "box_head"
    return "res5" if key.startswith("roi_heads.res5.") else key.split(".")[0]
