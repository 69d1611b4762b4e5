"""The resumable data stream: order and augmentation are functions of the stream position."""

import itertools
import random

import numpy as np
import pytest
import torch
from conftest import load_config

from insloc_detco.data import build_pretrain_train_loader
from insloc_detco.data.sampler import ResumableTrainingSampler, SeededMapDataset


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_a_stream_started_at_iteration_k_is_the_tail_of_the_stream_from_0():
    full = ResumableTrainingSampler(size=7, batch_size_per_rank=3, seed=11)
    resumed = ResumableTrainingSampler(size=7, batch_size_per_rank=3, seed=11)
    resumed.set_start(11, 5)  # 5 iterations of 3 samples: 15 positions later
    assert _take(resumed, 20) == _take(full, 35)[15:]


def test_every_epoch_is_a_permutation_and_seeds_differ():
    items = _take(ResumableTrainingSampler(size=7, batch_size_per_rank=2, seed=3), 21)
    positions = [p for _, p, _ in items]
    assert positions == list(range(21))
    epochs = [[i for _, _, i in items[e * 7 : (e + 1) * 7]] for e in range(3)]
    assert all(sorted(e) == list(range(7)) for e in epochs) and epochs[0] != epochs[1]
    other = [i for _, _, i in _take(ResumableTrainingSampler(7, 2, seed=4), 21)]
    assert other != [i for _, _, i in items]


def test_a_sample_is_mapped_the_same_wherever_it_comes_in_the_stream():
    def mapper(record):  # draws from all three generators, as augmentations do
        return (record, torch.rand(()).item(), np.random.rand(), random.random())

    ds = SeededMapDataset(list(range(10)), mapper)
    first = ds[(5, 42, 3)]
    ds[(5, 43, 4)]  # other draws in between
    assert ds[(5, 42, 3)] == first
    assert ds[(5, 44, 3)] != first and ds[(6, 42, 3)] != first  # position and seed count


@pytest.mark.slow  # loader workers are processes
def test_loader_batches_do_not_depend_on_workers_or_where_the_stream_starts():
    def batches(workers, start, n):
        cfg = load_config(
            "instant_test/pretrain_moco_v2.yaml", "SEED", 3, "DATALOADER.NUM_WORKERS", workers
        )
        loader = build_pretrain_train_loader(cfg)
        loader.sampler.set_start(3, start)
        return [
            {k: v.clone() for k, v in b.tensors.items()} for b in itertools.islice(iter(loader), n)
        ]

    reference = batches(0, 0, 4)
    for got in (batches(2, 0, 4), batches(2, 1, 3)[:3]):
        expected = reference[4 - len(got) :]
        assert all(torch.equal(a[k], b[k]) for a, b in zip(got, expected) for k in a)


# ------------------------------------------------------------------------------------------
# engine/resume.py: which checkpoints a start resumes by itself
# ------------------------------------------------------------------------------------------
def _run_state(cfg, **opts):
    from types import SimpleNamespace

    from insloc_detco.engine.resume import RunStateHook

    cfg = cfg.clone()
    cfg.merge_from_list([x for kv in opts.items() for x in kv])
    hook = RunStateHook(ResumableTrainingSampler(4, 2, seed=5), cfg.dump())
    hook.trainer = SimpleNamespace(cfg=cfg)
    hook.require_same_config = True
    return hook


def test_a_checkpoint_of_another_config_is_not_resumed_by_itself():
    from insloc_detco.engine.resume import ConfigMismatchError

    cfg = load_config("instant_test/pretrain_moco_v2.yaml")
    recorded = _run_state(cfg).state_dict()["config"]
    # How the run executes changes no result: resumed by itself.
    same_run = {
        "MODEL.FAST_PATH.ENABLED": "off",
        "SOLVER.LOG_PERIOD": 7,
        "DATALOADER.NUM_WORKERS": 3,
        "OUTPUT_DIR": "/elsewhere",
    }
    _run_state(cfg, **same_run).check_config(recorded)
    with pytest.raises(ConfigMismatchError, match=r"SOLVER.BASE_LR 0.\d+ -> 0.5.*--resume"):
        _run_state(cfg, **{"SOLVER.BASE_LR": 0.5}).check_config(recorded)
    with pytest.raises(ConfigMismatchError, match="records no config"):
        _run_state(cfg).check_config(None)
    hook = _run_state(cfg, **{"SOLVER.BASE_LR": 0.5})
    hook.require_same_config = False  # --resume: continue with the new config on purpose
    hook.check_config(recorded)
