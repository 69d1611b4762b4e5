"""What every evaluation run shares (``engine/runs.py``) and the rules written once for both
runners: the weights check (``transfer/fitting.match_weights``), data set names registered on
first use (``data/datasets.try_register``), the readout protocol table."""

import argparse
import json
import os

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

from insloc_detco.data.datasets import (
    ensure_registered,
    register_image_list,
    try_register,
)
from insloc_detco.engine.cluster_env import LaunchError
from insloc_detco.engine.runs import (
    RANDOM_INIT,
    Launch,
    add_launch_arguments,
    default_output_dir,
    format_mean_std,
    mean_std,
    merge_results_files,
    stamped,
)
from insloc_detco.readout.encoder import ReadoutError
from insloc_detco.readout.protocols import (
    PROTOCOLS,
    ReadoutData,
    cell_metrics,
    get_protocol,
    knn_metrics,
)
from insloc_detco.readout.results import METRIC_COLUMNS
from insloc_detco.transfer.converter import ConversionError
from insloc_detco.transfer.fitting import match_model_zoo_file, match_weights


# ------------------------------------------------------------------------------------------
# Launch, stamp, results files
# ------------------------------------------------------------------------------------------
def test_launch_arguments_and_output_folders():
    parser = argparse.ArgumentParser()
    add_launch_arguments(parser)
    args = ["--num-gpus", "4", "--num-machines", "2", "--machine-rank", "1"]
    launch = Launch.from_args(parser.parse_args(args))
    assert launch == Launch(4, 2, 1, "auto")
    assert launch.world_size == 8 and not launch.collects_results
    assert Launch().world_size == 1 and Launch().collects_results
    random_dir = os.path.join("output", "readout_random_init")
    assert default_output_dir(RANDOM_INIT, "readout") == random_dir
    ckpt = os.path.join("/runs", "moco", "model_final.pth")
    assert default_output_dir(ckpt, "transfer") == os.path.join("/runs", "moco", "transfer")


def test_cluster_launch_options_live_in_launch(monkeypatch):
    parser = argparse.ArgumentParser()
    add_launch_arguments(parser, slurm=True)
    launch = Launch.from_args(parser.parse_args(["--dist-timeout", "30"]))
    assert launch == Launch(dist_timeout=30.0) and not launch.submits
    submitting = Launch.from_args(parser.parse_args(["--slurm", "--nodes", "4"]))
    assert submitting.submits and submitting.machines == 4
    with pytest.raises(LaunchError, match="--slurm starts one task per GPU"):
        Launch.from_args(parser.parse_args(["--slurm", "--num-gpus", "8"]))
    # Under torchrun every process runs the entry script: rank 0 alone collects the results,
    # and the job's nodes are the machines.
    for k, v in dict(
        RANK="9",
        WORLD_SIZE="16",
        LOCAL_RANK="1",
        LOCAL_WORLD_SIZE="8",
        MASTER_ADDR="h",
        MASTER_PORT="1",
    ).items():
        monkeypatch.setenv(k, v)
    assert not Launch().collects_results and Launch().machines == 2
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert Launch().collects_results
    train_net_like = argparse.ArgumentParser()
    add_launch_arguments(train_net_like, processes=False, slurm=True)  # detectron2 has the rest
    args = train_net_like.parse_args(["--dist-timeout", "5", "--slurm"])
    assert args.dist_timeout == 5.0 and args.slurm and not hasattr(args, "num_gpus")


def test_one_launch_runs_the_function_here_with_its_arguments():
    seen = []
    Launch()(seen.append, "result")  # one process: in this process, as detectron2's launch
    assert seen == ["result"]


def test_stamp_and_merged_results(tmp_path):
    entry = stamped({"metrics": {"AP": 1.0}}, start=0.0)
    assert entry["metrics"] == {"AP": 1.0} and entry["world_size"] == 1
    assert entry["wall_s"] > 0 and entry["machine"] and entry["date"].endswith("UTC")
    assert set(entry["versions"]) == {"python", "torch", "torchvision", "detectron2"}
    assert entry["versions"]["torch"] == torch.__version__

    def render(results):
        return "".join(f"{k}={v['x']}\n" for k, v in sorted(results.items()))

    merge_results_files(str(tmp_path), {"a": {"x": 1}, "b": {"x": float("nan")}}, render)
    text = merge_results_files(str(tmp_path), {"b": {"x": 2}}, render)  # a is kept
    assert text == "a=1\nb=2\n" == (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": {"x": 1}, "b": {"x": 2}}
    merge_results_files(str(tmp_path), {"c": {"x": float("nan")}}, render)
    assert json.loads((tmp_path / "results.json").read_text())["c"] == {"x": None}  # JSON-safe


def test_mean_std_format():
    assert format_mean_std(mean_std([1.0, 2.0, 3.0])) == "2.0 ± 1.0"
    assert format_mean_std(mean_std([4.0])) == "4.0"
    assert format_mean_std(None) == "n/a" and format_mean_std(None, missing="") == ""


# ------------------------------------------------------------------------------------------
# The weights rule
# ------------------------------------------------------------------------------------------
def _model_state():
    return {
        "backbone.stem.conv1.weight": torch.zeros(2, 3),
        "backbone.res2.0.conv1.weight": torch.zeros(4, 2),
        "backbone.res2.0.conv1.norm.num_batches_tracked": torch.zeros(()),
        "roi_heads.box_head.fc1.weight": torch.zeros(5, 4),
    }


def test_match_weights_loads_by_name_and_reports_what_it_leaves():
    model = _model_state()
    weights = {
        "backbone.stem.conv1.weight": torch.ones(2, 3),
        "backbone.res2.0.conv1.weight": torch.ones(4, 2).numpy(),  # arrays too
        "proposal_generator.conv.weight": torch.ones(1),
    }
    with pytest.raises(ConversionError, match="would not be used by the net, e.g. proposal_gen"):
        match_weights(model, weights, "w.pkl", "the net")
    match = match_weights(model, weights, "w.pkl", "the net", allow_unused=True)
    assert sorted(match.loaded) == ["backbone.res2.0.conv1.weight", "backbone.stem.conv1.weight"]
    assert isinstance(match.loaded["backbone.res2.0.conv1.weight"], torch.Tensor)
    assert match.unused == ["proposal_generator.conv.weight"]
    assert match.missing == ["roi_heads.box_head.fc1.weight"]  # not the ResNet, no counters


def test_match_weights_refuses_wrong_shapes_and_an_incomplete_resnet():
    model = _model_state()
    wrong = {"backbone.stem.conv1.weight": torch.ones(2, 4)}  # the model's has 3 columns
    with pytest.raises(ConversionError, match=r"do not fit the net, e.g. backbone.stem.conv1.w"):
        match_weights(model, wrong, "w.pkl", "the net", allow_unused=True)
    partial = {"backbone.stem.conv1.weight": torch.ones(2, 3)}
    with pytest.raises(ConversionError, match=r"leaves 1 tensors of the ResNet.*res2\.0\.conv1"):
        match_weights(model, partial, "w.pkl", "the net", allow_unused=True)


def test_model_zoo_file_is_matched_with_detectron2_heuristics():
    model = _model_state()
    # Layout-neutral names (our "any" target, MoCo's converter): found by detectron2's
    # matching heuristics only when the file asks for them.
    neutral = {"stem.conv1.weight": torch.ones(2, 3), "res2.0.conv1.weight": torch.ones(4, 2)}
    data = {"__author__": "InsLocDetCo", "matching_heuristics": True, "model": neutral}
    match = match_model_zoo_file(model, data, "any.pkl", "the net")
    assert sorted(match.loaded) == ["backbone.res2.0.conv1.weight", "backbone.stem.conv1.weight"]
    data["matching_heuristics"] = False
    with pytest.raises(ConversionError, match="would not be used"):
        match_model_zoo_file(model, data, "any.pkl", "the net")


# ------------------------------------------------------------------------------------------
# Data set names registered on first use
# ------------------------------------------------------------------------------------------
def test_first_use_forms_of_every_package_in_one_place(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    lst = tmp_path / "list.txt"
    lst.write_text("a.png\n")
    name = f"list:{lst}"
    assert try_register(name) and name in DatasetCatalog.list()
    assert try_register(name)  # registered once: the second call finds it
    # Every package's forms answer the same question; the error names them all.
    with pytest.raises(KeyError, match="not registered") as error:
        ensure_registered("no_such_dataset")
    for form in ("'folder:PATH'", "'coco:JSON:IMAGE_ROOT'", "'class_folder:PATH'", "pct"):
        assert form in str(error.value)
    assert not try_register("no_such_base_10pct")  # the subset form declines: no base
    register_image_list("t_runs_base", str(lst))
    assert try_register("t_runs_base_50pct_seed3")
    assert MetadataCatalog.get("t_runs_base_50pct_seed3").subset_of == "t_runs_base"
    for n in (name, "t_runs_base", "t_runs_base_50pct_seed3"):
        DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)


# ------------------------------------------------------------------------------------------
# The readout protocol table
# ------------------------------------------------------------------------------------------
def test_protocol_table_is_the_one_list_of_protocols():
    assert list(PROTOCOLS) == list(METRIC_COLUMNS) == ["knn", "linear", "loc", "svm", "views"]
    assert get_protocol("svm").image_targets and get_protocol("loc").cell_boxes
    assert get_protocol("knn").single_label and get_protocol("linear").single_label
    with pytest.raises(ReadoutError, match=r"Unknown protocol 'lin'; choose one of \('knn'"):
        get_protocol("lin")


def test_metrics_from_features_follow_the_record_index():
    """kNN from a bank in another order (a shard) equals the bank in record order; the cell
    readouts need no labels beyond the boxes and the object boxes."""
    torch.manual_seed(0)
    records = [{"label": i % 2, "bbox": [0, 0, 8, 8], "width": 24, "height": 24} for i in range(8)]
    d = ReadoutData(records, records, ["a", "b"], 24, 24)
    feats = torch.randn(8, 16)
    in_order = {"index": torch.arange(8), "res5": feats}
    perm = torch.randperm(8)
    shuffled = {"index": perm, "res5": feats[perm]}
    a = knn_metrics(in_order, in_order, d, (3,), 0.07, "cpu")
    b = knn_metrics(shuffled, in_order, d, (3,), 0.07, "cpu")
    assert a == b and a["top1@k3"] == 100.0  # each query finds itself
    from insloc_detco.readout.linear import LinearRecipe

    boxes = {"boxes": torch.eye(9).repeat(8, 1)}  # cell i's feature: one-hot i
    out = cell_metrics(boxes, boxes, d, 3, LinearRecipe(epochs=10, lr=1.0, batch_size=8))
    assert out["Loc"] == 100.0 and set(out) == {"Loc", "ObjLoc"}
