"""bench/mini_benchmark.py without running it: the commands it builds, the order it schedules."""

import importlib.util
import os

import pytest
from conftest import PROJECT_DIR


@pytest.fixture(scope="module")
def mb():
    path = os.path.join(PROJECT_DIR, "bench", "mini_benchmark.py")
    spec = importlib.util.spec_from_file_location("mini_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _opts(cmd):
    """KEY VALUE pairs after the config file and flags of a train_net command."""
    i = cmd.index("MODEL.DEVICE")
    return dict(zip(cmd[i::2], cmd[i + 1 :: 2]))


def test_roi_pooler_reaches_insloc_c4_only(mb):
    args = mb.parse_args(["--roi-pooler", "5", "--image-size", "48"])
    for method in ("moco_v2", "insloc_c4", "insloc_fpn", "detco"):
        opts = _opts(mb.pretrain_command(method, 2, args, "/out", "/pool"))
        assert opts["SEED"] == "2" and opts["SOLVER.MAX_ITER"] == str(args.pretrain_iters)
        assert opts.get("MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION") == (
            "5" if method == "insloc_c4" else None
        )
        size_key = "INPUT.PRETRAIN.COPY_PASTE.CANVAS_SIZE"
        if method.startswith("insloc"):
            assert opts[size_key] == "48"
        else:
            assert opts["INPUT.PRETRAIN.CROP_SIZE"] == "48"


def test_every_pretrained_method_has_a_scheduling_cost(mb):
    # main() sorts the pretraining runs by STEP_COST: a new method without one would fail there.
    assert {m for m, recipe in mb.METHODS.items() if recipe} == set(mb.STEP_COST)
    for recipe in filter(None, mb.METHODS.values()):
        assert os.path.isfile(os.path.join(PROJECT_DIR, "configs", recipe)), recipe


def test_unknown_method_is_refused(mb):
    with pytest.raises(SystemExit, match="Unknown method"):
        mb.main(["--methods", "moco_v2,simclr", "--output-dir", "/nonexistent/never/created"])
