"""bench/mini_benchmark.py and bench/mini_transfer.py without running them: the commands they
build (through bench/mini_runs.py), the order they schedule, the table they write."""

import importlib.util
import os

import pytest
from conftest import PROJECT_DIR


def _load(name):
    path = os.path.join(PROJECT_DIR, "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mb():
    return _load("mini_benchmark")


@pytest.fixture(scope="module")
def mt():
    return _load("mini_transfer")


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


def test_both_studies_pretrain_with_the_same_command_and_their_own_budget(mb, mt):
    shared = [
        "SOLVER.MAX_ITER",
        "SOLVER.IMS_PER_BATCH",
        "SOLVER.BASE_LR",
        "SOLVER.LOG_PERIOD",
        "MODEL.CONTRAST.QUEUE_SIZE",
        "DATALOADER.NUM_WORKERS",
        "OUTPUT_DIR",
    ]
    readouts = _opts(mb.pretrain_command("detco", 3, mb.parse_args([]), "/out", "/pool"))
    transfer_args = mt.parse_args(["--pretrain-iters", "400"])
    transfer = _opts(mt.pretrain_command("detco", transfer_args, "/out", "/list.txt"))
    assert set(shared) <= set(readouts) & set(transfer)
    assert readouts["DATASETS.TRAIN"] == "('folder:/pool',)" and readouts["SEED"] == "3"
    # The transfer study: its image list, unseeded pretraining, a checkpoint every 100 steps.
    assert transfer["DATASETS.TRAIN"] == "('list:/list.txt',)" and "SEED" not in transfer
    assert transfer["SOLVER.MAX_ITER"] == "400" and transfer["SOLVER.CHECKPOINT_PERIOD"] == "100"
    assert transfer["MODEL.CONTRAST.QUEUE_SIZE"] == "128" and readouts["OUTPUT_DIR"] == "/out"


def test_unknown_method_is_refused_by_both(mb, mt):
    argv = ["--methods", "moco_v2,simclr", "--output-dir", "/nonexistent/never/created"]
    for study in (mb, mt):
        with pytest.raises(SystemExit, match="Unknown method"):
            study.main(argv)


def test_table_rows_mean_std_and_seeds(mt):
    from insloc_detco.engine.runs import mean_std

    results = {
        "random": {"summary": {"AP": mean_std([1.0, 2.0])}, "trials": [{}, {}]},
        "moco_v2": {"summary": {"AP": mean_std([3.0])}, "trials": [{}]},
    }
    assert mt.table(results).splitlines() == [
        "| pretraining | AP | AP50 | AP75 | APmask | seeds |",
        "|---|---|---|---|---|---|",
        "| random | 1.5 ± 0.7 | n/a | n/a | n/a | 2 |",
        "| moco_v2 | 3.0 | n/a | n/a | n/a | 1 |",
    ]
