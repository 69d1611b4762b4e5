"""PretrainBatch: stacked in the loader worker, iterated as detectron2's list of dicts."""

import pickle

import torch
from conftest import load_config

from insloc_detco.data.batch import BatchCollator, PretrainBatch
from insloc_detco.data.build import build_pretrain_train_loader


def _samples(n=3):
    return [
        {
            "view_q": torch.full((3, 4, 4), i, dtype=torch.uint8),
            "box_q": torch.arange(4.0) + i,
            "image_id": i,
            "num_skipped": 0,
            "ragged": torch.zeros(i + 1),
        }
        for i in range(n)
    ]


def test_stacks_same_shaped_tensors_and_iterates_as_dicts():
    batch = PretrainBatch(_samples())
    assert set(batch.tensors) == {"view_q", "box_q"}  # "ragged" differs in shape
    assert batch.stacked("view_q").shape == (3, 3, 4, 4) and batch.stacked("ragged") is None
    assert len(batch) == 3
    for i, sample in enumerate(batch):
        assert sample["image_id"] == i and torch.equal(sample["box_q"], torch.arange(4.0) + i)
        assert torch.equal(sample["view_q"], torch.full((3, 4, 4), i, dtype=torch.uint8))
        assert sample["ragged"].shape == (i + 1,)
    assert batch[2]["image_id"] == 2


def test_pickles_the_stacked_tensors_once():
    batch = PretrainBatch(_samples())
    list(batch)  # per-sample views exist now; they must not be pickled again
    state = batch.__getstate__()
    assert all("view_q" not in s and "box_q" not in s for s in state["extras"])
    clone = pickle.loads(pickle.dumps(batch))
    assert torch.equal(clone.stacked("view_q"), batch.stacked("view_q"))
    assert [s["image_id"] for s in clone] == [0, 1, 2]
    assert torch.equal(clone[1]["view_q"], batch[1]["view_q"])


def test_collator_runs_the_mapper_collate_first():
    calls = []

    def collate(samples):
        calls.append(len(samples))
        return samples[::-1]

    batch = BatchCollator(collate)(_samples())
    assert calls == [3] and [s["image_id"] for s in batch] == [2, 1, 0]


def test_loader_yields_stacked_batches_from_workers():
    cfg = load_config("instant_test/pretrain_moco_v2.yaml", "DATALOADER.NUM_WORKERS", 1)
    batch = next(iter(build_pretrain_train_loader(cfg)))
    assert isinstance(batch, PretrainBatch) and len(batch) == cfg.SOLVER.IMS_PER_BATCH
    s = cfg.INPUT.PRETRAIN.CROP_SIZE
    assert batch.stacked("view_q").shape == (cfg.SOLVER.IMS_PER_BATCH, 3, s, s)
    assert all("num_skipped" not in d for d in batch.extras)  # counted by the loader wrapper
