"""The rules written once for both runners: the weights check
(``transfer/fitting.match_weights``)."""

import pytest
import torch

from insloc_detco.transfer.converter import ConversionError
from insloc_detco.transfer.fitting import match_model_zoo_file, match_weights


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
