"""Weights files never run code: the restricted loader, the trainer's checkpointer, the CLI."""

import collections
import importlib.util
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from insloc_detco.checkpoint import (
    SafeDetectionCheckpointer,
    UnsafeWeightsError,
    load_weights_file,
)
from insloc_detco.transfer.converter import ConversionError, load_model_zoo_pkl

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: what a hostile weights file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _hostile_pkl(path, marker):
    data = {"model": {"w": np.ones(2, np.float32)}, "__author__": "x", "hook": _Payload(marker)}
    with open(path, "wb") as f:
        pickle.dump(data, f)


def _model_zoo_data():
    return {
        "model": collections.OrderedDict(
            [
                ("backbone.stem.conv1.weight", np.arange(6, dtype=np.float32).reshape(2, 3)),
                ("backbone.res2.0.conv1.norm.num_batches_tracked", np.int64(7)),
            ]
        ),
        "__author__": "someone",
        "matching_heuristics": True,
    }


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_model_zoo_pkl_loads(tmp_path, protocol):
    path = str(tmp_path / "m.pkl")
    with open(path, "wb") as f:
        pickle.dump(_model_zoo_data(), f, protocol=protocol)
    data = load_weights_file(path)
    np.testing.assert_array_equal(
        data["model"]["backbone.stem.conv1.weight"], np.arange(6, dtype=np.float32).reshape(2, 3)
    )
    assert data["model"]["backbone.res2.0.conv1.norm.num_batches_tracked"] == 7
    assert data["__author__"] == "someone" and data["matching_heuristics"] is True


@pytest.mark.parametrize("zipfile_format", [True, False])
def test_torch_files_load(tmp_path, zipfile_format):
    path = str(tmp_path / "m.pth")
    ckpt = {"model": {"w": torch.arange(4.0)}, "iteration": 3, "arch": "resnet50"}
    torch.save(ckpt, path, _use_new_zipfile_serialization=zipfile_format)
    data = load_weights_file(path)
    assert torch.equal(data["model"]["w"], torch.arange(4.0)) and data["iteration"] == 3


def test_hostile_pkl_is_refused_before_running(tmp_path):
    marker = str(tmp_path / "pwned")
    path = str(tmp_path / "evil.pkl")
    _hostile_pkl(path, marker)
    with pytest.raises(UnsafeWeightsError, match=r"io\.open"):
        load_weights_file(path)
    assert not os.path.exists(marker)
    with pytest.raises(ConversionError, match="Refusing to load"):
        load_model_zoo_pkl(path)
    assert not os.path.exists(marker)


def test_hostile_torch_file_is_refused_before_running(tmp_path):
    marker = str(tmp_path / "pwned")
    path = str(tmp_path / "evil.pth")
    torch.save({"model": {"w": torch.ones(1)}, "hook": _Payload(marker)}, path)
    with pytest.raises(UnsafeWeightsError, match="Refusing to load"):
        load_weights_file(path)
    assert not os.path.exists(marker)


def test_checkpointer_loads_model_zoo_and_caffe2_pkls(tmp_path):
    model = nn.Sequential(collections.OrderedDict(fc=nn.Linear(3, 2)))
    zoo = {
        "model": {"fc.weight": np.full((2, 3), 2.0, np.float32), "fc.bias": np.zeros(2)},
        "__author__": "someone",
    }
    path = str(tmp_path / "zoo.pkl")
    with open(path, "wb") as f:
        pickle.dump(zoo, f)
    SafeDetectionCheckpointer(model).load(path)
    assert torch.equal(model.fc.weight, torch.full((2, 3), 2.0))
    # Caffe2-style: a bare dict of blobs; the solver's momentum blobs are dropped.
    caffe2 = {
        "blobs": {
            "fc.weight": np.full((2, 3), 3.0, np.float32),
            "fc.weight_momentum": np.zeros((2, 3), np.float32),
        }
    }
    with open(path, "wb") as f:
        pickle.dump(caffe2, f)
    loaded = SafeDetectionCheckpointer(model)._load_file(path)
    assert set(loaded["model"]) == {"fc.weight"} and loaded["__author__"] == "Caffe2"


def test_checkpointer_refuses_hostile_weights(tmp_path):
    """MODEL.WEIGHTS X.pkl / X.pth in train_net.py and the fine-tuning trainer."""
    model = nn.Linear(3, 2)
    marker = str(tmp_path / "pwned")
    pkl = str(tmp_path / "evil.pkl")
    _hostile_pkl(pkl, marker)
    with pytest.raises(UnsafeWeightsError):
        SafeDetectionCheckpointer(model).load(pkl)
    pth = str(tmp_path / "evil.pth")
    torch.save({"model": model.state_dict(), "hook": _Payload(marker)}, pth)
    with pytest.raises(UnsafeWeightsError):
        SafeDetectionCheckpointer(model).load(pth)
    assert not os.path.exists(marker)


def test_trainers_use_the_safe_checkpointer(cfg_loader):
    from insloc_detco.engine import PretrainTrainer

    cfg = cfg_loader("instant_test/pretrain_moco_v2.yaml", "DATALOADER.NUM_WORKERS", "0")
    trainer = PretrainTrainer(cfg)
    assert isinstance(trainer.checkpointer, SafeDetectionCheckpointer)


def test_eval_transfer_refuses_hostile_pkl(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "eval_transfer", os.path.join(PROJECT_DIR, "eval_transfer.py")
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    marker = str(tmp_path / "pwned")
    pkl = str(tmp_path / "evil.pkl")
    _hostile_pkl(pkl, marker)
    out = str(tmp_path / "out")
    assert cli.main(["run", pkl, "--benchmark", "demo_voc_c4", "--output-dir", out]) == 2
    assert "Refusing to load" in capsys.readouterr().err
    assert not os.path.exists(marker)
