"""knn, linear --cached and loc at any data-set size (CPU): every process keeps its features in
a shard on disk, read back memory-mapped in blocks. The results equal those of features held
in memory, several processes agree with one, and the peak memory of a readout does not grow
with the number of images."""

import importlib.util
import os
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PROJECT_DIR
from detectron2.data import DatasetCatalog, MetadataCatalog
from insloc_testing import run_distributed
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from insloc_detco.readout import feature_store, runner
from insloc_detco.readout.datasets import class_labels, register_class_folder
from insloc_detco.readout.encoder import RANDOM_INIT, ReadoutError, WeightsReport
from insloc_detco.readout.feature_store import FeatureStore
from insloc_detco.readout.features import eval_transform, extract_features
from insloc_detco.readout.knn import knn_accuracy, sharded_knn_accuracy
from insloc_detco.readout.linear import LinearRecipe, linear_probe
from insloc_detco.readout.localization import grid_boxes, localization_probe
from insloc_detco.readout.protocols import ReadoutData, cell_metrics, knn_metrics, linear_metrics

DIM, CLASSES, SIZE = 1024, 4, 24
# Bytes per image a readout may keep besides features (a file name, an index, a label).
PER_IMAGE = 512
BLOCK = 16 * DIM * 4
RECIPE = LinearRecipe(epochs=3, lr=0.5, batch_size=16, milestones=(2,), normalize="standardize")


def _bench():
    path = os.path.join(PROJECT_DIR, "bench", "bench_readout_memory.py")
    spec = importlib.util.spec_from_file_location("bench_readout_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = _bench()  # the stub network and the generated class folders


def _stub():
    return BENCH.StubEncoder(DIM)


@pytest.fixture(scope="module")
def sets(module_folder):
    """{images: (train, val) names}: generated class folders of N and 4N training images."""
    root = module_folder("memory_sets")
    names = {}
    for n in (48, 192):
        pair = []
        for split, count, seed in (("train", n, n), ("val", n // 2, n + 1)):
            name = f"t_memory_{split}_{n}"
            BENCH.write_class_folder(str(root / name), count, CLASSES, SIZE, seed)
            register_class_folder(name, str(root / name))
            pair.append(name)
        names[n] = tuple(pair)
    yield names
    for pair in names.values():
        for name in pair:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def _settings(protocol, train, val, tmp_path, **kw):
    return runner.ReadoutSettings(
        protocol=protocol,
        train=train,
        val=val,
        resize=SIZE,
        crop=SIZE,
        batch_size=8,
        num_workers=0,
        recipe=RECIPE,
        ks=(5, 10),
        cached=True,
        feature_dir=str(tmp_path / "features"),
        **kw,
    )


def _readout(protocol, train, val, tmp_path, **kw):
    """``readout_one`` with the stub network; the data loaded first (outside any measurement)."""
    s = _settings(protocol, train, val, tmp_path, **kw)
    data = runner.load_readout_data(s)
    return lambda: runner.readout_one(RANDOM_INIT, s, str(tmp_path / "out"), data)["metrics"]


@pytest.fixture
def stub_network(monkeypatch):
    stub = (_stub(), WeightsReport(weights=RANDOM_INIT))
    monkeypatch.setattr(runner, "build_readout_encoder", lambda *a, **k: stub)
    # Blocks of 16 feature rows: far fewer than the images' rows.
    monkeypatch.setattr(feature_store, "READ_BLOCK_BYTES", BLOCK)


# ------------------------------------------------------------------------------------------
# The store
# ------------------------------------------------------------------------------------------
def _batches(n, rows=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n, 4):
        index = torch.arange(start, min(n, start + 4))
        yield (
            index,
            {
                "a": torch.randn(len(index), 5, generator=g),
                "boxes": torch.randn(len(index) * rows, 2, generator=g),
            },
        )


def test_feature_store_writes_reads_and_removes_shards(tmp_path, monkeypatch):
    expected = list(_batches(10))
    with FeatureStore(str(tmp_path / "f")) as store:
        shard = store.write("train", iter(expected), 10)
        assert shard.index.tolist() == list(range(10)) and shard.rows == {"a": 1, "boxes": 3}
        assert isinstance(shard.arrays["a"], np.memmap)
        np.testing.assert_array_equal(shard.arrays["a"], torch.cat([e[1]["a"] for e in expected]))
        assert shard.arrays["boxes"].shape == (30, 2)
        assert all(os.path.isfile(f) for f in shard.files)
    assert not os.path.exists(tmp_path / "f")  # removed with the run folder
    with FeatureStore(str(tmp_path / "k"), dtype="float16", keep=True) as store:
        half = store.write("val", _batches(10), 10)
    assert half.arrays["a"].dtype == np.float16 and os.path.isfile(half.files[0])
    np.testing.assert_allclose(half.arrays["a"], shard_values(expected), rtol=1e-3, atol=1e-3)
    with FeatureStore(str(tmp_path / "h"), dtype="float16") as store:
        huge = [(torch.arange(2), {"a": torch.full((2, 3), 1e6)})]
        with pytest.raises(ReadoutError, match="float16"):
            store.write("train", iter(huge), 2)
    monkeypatch.setattr(feature_store.shutil, "disk_usage", lambda p: type("U", (), {"free": 10}))
    with FeatureStore(str(tmp_path / "d")) as store:
        with pytest.raises(ReadoutError, match="--feature-dir"):
            store.write("train", _batches(10), 10)
    with pytest.raises(ReadoutError, match="dtype"):
        FeatureStore(str(tmp_path), dtype="int8")


def shard_values(batches):
    return torch.cat([b[1]["a"] for b in batches]).numpy()


# ------------------------------------------------------------------------------------------
# The same results as features in memory
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_shards_on_disk_give_the_in_memory_results(sets, tmp_path, stub_network):
    train, val = sets[48]
    records = [DatasetCatalog.get(train), DatasetCatalog.get(val)]
    labels = [torch.as_tensor(class_labels(r)) for r in records]
    tf, boxes = eval_transform(SIZE, SIZE), grid_boxes(SIZE, SIZE, 3)
    enc = _stub()
    mem = [extract_features(enc, r, tf, boxes=boxes, batch_size=8, num_workers=0) for r in records]
    expected = {
        "knn": knn_accuracy(mem[0]["res5"], labels[0], mem[1]["res5"], labels[1], CLASSES, (5, 10)),
        "linear": linear_probe(
            mem[0]["res5"], labels[0], mem[1]["res5"], labels[1], CLASSES, RECIPE
        ),
        "loc": {
            **localization_probe(mem[0]["boxes"], mem[1]["boxes"], 9, RECIPE),
            "Cls": linear_probe(
                mem[0]["res5"], labels[0], mem[1]["res5"], labels[1], CLASSES, RECIPE
            )["top1"],
        },
    }
    assert expected["knn"]["top1@k5"] > 60 and expected["loc"]["Loc"] > 60  # not at chance
    for protocol, want in expected.items():
        assert _readout(protocol, train, val, tmp_path)() == want, protocol
    assert not os.path.exists(tmp_path / "features")  # shards removed after each readout


def _cell_records(n, seed):
    """Records whose object sits in cell (i * 5 + seed) % 9 of a 24 px image."""
    out = []
    for i in range(n):
        cell = (i * 5 + seed) % 9
        x0, y0 = (cell % 3) * 8 + 1, (cell // 3) * 8 + 1
        out.append(
            {
                "label": i % CLASSES,
                "bbox": [x0, y0, x0 + 6, y0 + 6],
                "width": SIZE,
                "height": SIZE,
                "cell": cell,
            }
        )
    return out


def _known_features(records, order, g):
    """Features in ``order`` (a shard's rows): res5 says the class, each cell's row its index
    and, for the object's cell, an object direction."""
    proj = torch.randn(CLASSES + 10, 16, generator=torch.Generator().manual_seed(7))
    labels = torch.tensor([records[i]["label"] for i in order])
    res5 = F.one_hot(labels, CLASSES + 10).float() @ proj
    cells = torch.eye(9).repeat(len(order), 1)
    is_object = torch.zeros(len(order), 9)
    is_object[torch.arange(len(order)), torch.tensor([records[i]["cell"] for i in order])] = 1
    boxes = torch.cat([cells, is_object.view(-1, 1)], 1) @ proj[:10]
    return {
        "index": order,
        "res5": res5 + 0.05 * torch.randn(res5.shape, generator=g),
        "boxes": boxes + 0.05 * torch.randn(boxes.shape, generator=g),
    }


def test_metric_functions_read_shards_on_disk_as_tensors_in_memory(tmp_path):
    """The protocols' metric functions (the mini benchmark calls them on tensors) give the same
    numbers on memory-mapped shards as on tensors, rows in any record order."""
    g = torch.Generator().manual_seed(0)
    d = ReadoutData(
        _cell_records(40, 0), _cell_records(20, 1), [str(c) for c in range(CLASSES)], SIZE, SIZE
    )
    memory = [_known_features(r, torch.randperm(len(r), generator=g), g) for r in (d.train, d.val)]
    recipe = LinearRecipe(
        epochs=20, lr=0.5, batch_size=8, milestones=(15,), normalize="standardize"
    )
    with FeatureStore(str(tmp_path / "f")) as store:
        disk = [
            store.write(
                split, iter([(f["index"], {k: f[k] for k in ("res5", "boxes")})]), len(f["index"])
            )
            for split, f in zip(("train", "val"), memory)
        ]
        for features in (memory, disk):
            got = {
                **knn_metrics(*features, d, (3,), 0.07, "cpu"),
                **linear_metrics(*features, d, recipe),
                **cell_metrics(*features, d, 3, recipe),
            }
            if features is memory:
                expected = got
    assert got == expected
    assert got["top1@k3"] == got["top1"] == got["Loc"] == got["ObjLoc"] == 100.0, got


# ------------------------------------------------------------------------------------------
# Several processes
# ------------------------------------------------------------------------------------------
def _sharded(bank, bank_y, queries, query_y, expected_knn, good_x, good_y):
    from detectron2.utils import comm

    rank, world = comm.get_rank(), comm.get_world_size()
    got = sharded_knn_accuracy(
        bank[rank::world],
        bank_y[rank::world],
        queries[rank::world],
        query_y[rank::world],
        8,
        ks=(3, 7),
        chunk=2,
    )
    assert got == pytest.approx(expected_knn)
    # The classifier: every process its own samples, one model (DDP), one accuracy for all.
    acc = linear_probe(
        good_x[rank::world],
        good_y[rank::world],
        good_x[rank::world],
        good_y[rank::world],
        8,
        RECIPE,
        distributed=True,
    )
    assert acc["top1"] > 90
    assert comm.all_gather(acc) == [acc] * world


@pytest.mark.slow
def test_sharded_knn_and_linear_over_two_processes():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(50, 16, generator=g), torch.randn(9, 16, generator=g)
    bank_y, query_y = torch.randint(8, (50,), generator=g), torch.randint(8, (9,), generator=g)
    expected = knn_accuracy(bank, bank_y, queries, query_y, 8, ks=(3, 7))
    good_y = torch.arange(200) % 8
    good_x = torch.nn.functional.one_hot(good_y, 8).float() @ torch.randn(8, 16, generator=g)
    good_x += 0.1 * torch.randn(200, 16, generator=g)
    run_distributed(_sharded, 2, args=(bank, bank_y, queries, query_y, expected, good_x, good_y))


# ------------------------------------------------------------------------------------------
# Bounded memory
# ------------------------------------------------------------------------------------------
class _LargestTensor(TorchDispatchMode):
    """The largest storage any torch operation returned (bytes)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def _peaks(run):
    """(largest tensor, peak of Python and numpy allocations) of ``run()``, in bytes."""
    tracemalloc.start()
    try:
        with _LargestTensor() as probe:
            run()
        return probe.largest, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["loc", "knn", "linear"])
def test_peak_memory_does_not_grow_with_the_images(sets, tmp_path, stub_network, protocol):
    _readout(protocol, *sets[48], tmp_path / "warm-up")()  # one-time allocations (imports)
    peaks = {n: _peaks(_readout(protocol, *sets[n], tmp_path / str(n))) for n in sets}
    (tensor_n, heap_n), (tensor_4n, heap_4n) = peaks[48], peaks[192]
    rows = 9 + 1 if protocol == "loc" else 1  # features per image: cells and whole image
    # Nothing the size of the data set: the largest tensor is a batch's (8 images) or a block's,
    batch = 8 * 4 * max(rows * DIM, 3 * SIZE * SIZE)
    assert tensor_n <= max(batch, BLOCK) and tensor_4n == tensor_n, peaks
    # ... and the 216 more images (train and val) add a few hundred bytes each, not their
    # features (rows * DIM * 4 = 4 or 40 kB each).
    assert heap_4n - heap_n < 216 * PER_IMAGE, peaks
