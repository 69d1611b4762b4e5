"""Fake checkpoints in each project's own naming (read from their code), for the tests.

MoCo's ``main_moco.py`` (``state_dict`` of the DDP-wrapped model: ``module.encoder_q.*``,
``module.queue``), torchvision ``resnet50-*.pth``, DenseCL's raw OpenSelfSup checkpoint
(``encoder_q.0`` = ResNet, ``backbone`` = the same module again, ``queue2``) and its released
``extract_backbone_weights.py`` output, DetCo's released backbone (a torch file named ``.pkl``),
InstanceLoc's mmdetection FPN (``neck.{lateral,fpn}_convs.i.{conv,bn}``,
``roi_head.bbox_head.shared_convs.i.{conv,bn}``, ``shared_fcs``) and C4
(``roi_head.shared_head.layer4``) checkpoints, and MoCo's converter output.
"""

import os
import pickle

import numpy as np
import torch
import torchvision

BN_PARAMS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


# ------------------------------------------------------------------------------------------
# Fakes
# ------------------------------------------------------------------------------------------
def _randomised(shape, g, kind="weight"):
    if kind == "running_var":
        return torch.rand(shape, generator=g) + 0.5
    if kind == "num_batches_tracked":
        return torch.tensor(7)
    return torch.randn(shape, generator=g) * (0.05 if kind == "conv" else 0.3) + (
        1.0 if kind == "weight" else 0.0
    )


def torchvision_resnet():
    """A torchvision ResNet-50 in eval mode with random BN statistics and affine."""
    torch.manual_seed(0)
    net = torchvision.models.resnet50()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for p in ("weight", "bias", "running_mean", "running_var"):
                    getattr(m, p).copy_(_randomised(m.num_features, g, p))
    return net.eval()


def no_fc(sd):
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def _conv_module(prefix, cin, cout, k, g):
    """mmcv ConvModule with BN: conv without bias, then ``bn``."""
    sd = {f"{prefix}.conv.weight": torch.randn(cout, cin, k, k, generator=g) * 0.05}
    sd.update({f"{prefix}.bn.{p}": _randomised(cout, g, p) for p in BN_PARAMS})
    return sd


def insloc_heads():
    """InstanceLoc's FPN neck and box head (mmcv names), random values."""
    g = torch.Generator().manual_seed(2)
    sd = {}
    for i, cin in enumerate((256, 512, 1024, 2048)):
        sd.update(_conv_module(f"neck.lateral_convs.{i}", cin, 256, 1, g))
        sd.update(_conv_module(f"neck.fpn_convs.{i}", 256, 256, 3, g))
    for i in range(4):
        sd.update(_conv_module(f"roi_head.bbox_head.shared_convs.{i}", 256, 256, 3, g))
    sd["roi_head.bbox_head.shared_fcs.0.weight"] = torch.randn(1024, 256 * 49, generator=g) * 0.01
    sd["roi_head.bbox_head.shared_fcs.0.bias"] = torch.randn(1024, generator=g)
    sd["roi_head.bbox_head.shared_fcs.1.weight"] = torch.randn(1024, 1024, generator=g)
    sd["roi_head.bbox_head.shared_fcs.1.bias"] = torch.randn(1024, generator=g)
    sd["roi_head.bbox_head.fc_cls.weight"] = torch.randn(128, 1024, generator=g)
    sd["roi_head.bbox_head.fc_cls.bias"] = torch.randn(128, generator=g)
    return sd


def _key_encoder(sd, old, new):
    """The momentum branch: the same names, tiny placeholder values (left out anyway)."""
    return {new + k[len(old) :]: torch.zeros(1) for k in sd if k.startswith(old)}


def write_fakes(folder, resnet_sd, heads):
    """name -> path of a fake checkpoint in that project's naming."""
    backbone = no_fc(resnet_sd)
    paths = {}

    def save(name, obj, file_name, **kw):
        paths[name] = os.path.join(folder, file_name)
        torch.save(obj, paths[name], **kw)

    # MoCo v2 (main_moco.py, --mlp): the DDP-wrapped model's state dict, key encoder in full.
    moco = {f"module.encoder_q.{k}": v for k, v in backbone.items()}
    moco.update({f"module.encoder_k.{k}": v + 1 for k, v in backbone.items()})
    for enc in ("encoder_q", "encoder_k"):
        moco[f"module.{enc}.fc.0.weight"], moco[f"module.{enc}.fc.0.bias"] = (
            torch.randn(2048, 2048),
            torch.randn(2048),
        )
        moco[f"module.{enc}.fc.2.weight"], moco[f"module.{enc}.fc.2.bias"] = (
            torch.randn(128, 2048),
            torch.randn(128),
        )
    moco["module.queue"] = torch.randn(128, 64)
    moco["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    optimizer = {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": [0, 1]}]}
    save(
        "moco_v2",
        {"epoch": 200, "arch": "resnet50", "state_dict": moco, "optimizer": optimizer},
        "moco_v2_200ep_pretrain.pth.tar",
    )
    # MoCo v1: one fc layer, the legacy (non-zip) torch format.
    v1 = {k: v for k, v in moco.items() if ".fc." not in k}
    v1["module.encoder_q.fc.weight"], v1["module.encoder_q.fc.bias"] = (
        torch.randn(128, 2048),
        torch.randn(128),
    )
    save(
        "moco_v1",
        {"epoch": 200, "arch": "resnet50", "state_dict": v1},
        "moco_v1_200ep_pretrain.pth.tar",
        _use_new_zipfile_serialization=False,
    )
    save("torchvision", resnet_sd, "resnet50-0676ba61.pth")
    # DenseCL raw (OpenSelfSup runner): encoder_q = Sequential(ResNet, neck); self.backbone is
    # encoder_q[0] again, so its tensors are in the state dict twice; two queues.
    densecl = {f"encoder_q.0.{k}": v for k, v in backbone.items()}
    densecl.update({f"backbone.{k}": v for k, v in backbone.items()})
    densecl.update(_key_encoder(densecl, "encoder_q.0.", "encoder_k.0."))
    densecl["encoder_q.1.mlp.0.weight"] = densecl["encoder_k.1.mlp.0.weight"] = torch.ones(2, 2)
    for q in ("queue", "queue2"):
        densecl[q], densecl[q + "_ptr"] = torch.randn(128, 16), torch.zeros(1, dtype=torch.long)
    meta = {"epoch": 200, "iter": 1000, "config": "model = dict(...)"}
    save(
        "densecl_raw",
        {"meta": meta, "state_dict": densecl, "optimizer": optimizer},
        "epoch_200.pth",
    )
    save(
        "densecl_released",
        {"state_dict": backbone, "author": "DenseCL"},
        "densecl_r50_imagenet_200ep.pth",
    )
    save("detco_released", {"state_dict": backbone}, "detco_200ep.pkl")  # a torch file
    # InstanceLoc FPN (mmdetection): query branch backbone / neck / roi_head, momentum branch
    # backbone_k / neck_k / roi_head_k, one queue per level.
    insloc = {f"backbone.{k}": v for k, v in backbone.items()}
    insloc.update(heads)
    insloc.update(_key_encoder(insloc, "backbone.", "backbone_k."))
    insloc.update(_key_encoder(heads, "neck.", "neck_k."))
    insloc.update(_key_encoder(heads, "roi_head.", "roi_head_k."))
    insloc["queues"], insloc["queue_ptr"] = torch.randn(4, 128, 16), torch.zeros(1).long()
    save(
        "insloc_fpn",
        {"meta": {"epoch": 200, "mmcv_version": "1.0.5"}, "state_dict": insloc},
        "insloc_fpn_200ep.pth",
    )
    # InstanceLoc C4: ResNet layer1-3 in the backbone, layer4 as the RoI "shared head".
    c4 = {f"backbone.{k}": v for k, v in backbone.items() if not k.startswith("layer4.")}
    c4.update(
        {f"roi_head.shared_head.{k}": v for k, v in backbone.items() if k.startswith("layer4.")}
    )
    c4.update(_key_encoder(c4, "backbone.", "backbone_k."))
    c4.update(_key_encoder(c4, "roi_head.shared_head.", "roi_head_k.shared_head."))
    c4["roi_head.bbox_head.fc_cls.weight"] = torch.randn(128, 2048)
    c4["queue"], c4["queue_ptr"] = torch.randn(128, 16), torch.zeros(1).long()
    save("insloc_c4", {"meta": {"epoch": 200}, "state_dict": c4}, "insloc_c4_200ep.pth")
    # MoCo's convert-pretrain-to-detectron2.py output: detectron2 ResNet names, numpy, and
    # encoder_q.fc renamed to stem.fc.
    neutral = {detectron2_name(k): v.numpy() for k, v in backbone.items()}
    neutral["stem.fc.0.weight"] = np.zeros((2048, 2048), np.float32)
    paths["moco_converted"] = os.path.join(folder, "moco_v2_converted.pkl")
    with open(paths["moco_converted"], "wb") as f:
        pickle.dump({"model": neutral, "__author__": "MOCO", "matching_heuristics": True}, f)
    return paths


def detectron2_name(tv_key: str) -> str:
    """torchvision ResNet name -> detectron2 ResNet name, spelled out for the test."""
    parts = tv_key.split(".")
    if parts[0] in ("conv1", "bn1"):
        return "stem.conv1." + ("weight" if parts[0] == "conv1" else "norm." + parts[1])
    stage, block, layer, *rest = parts
    stage = "res" + str(int(stage[len("layer") :]) + 1)
    if layer == "downsample":
        layer, rest = "shortcut", (["weight"] if rest[0] == "0" else ["norm"] + rest[1:])
    elif layer.startswith("bn"):
        layer, rest = "conv" + layer[2:], ["norm"] + rest
    return ".".join([stage, block, layer] + rest)
