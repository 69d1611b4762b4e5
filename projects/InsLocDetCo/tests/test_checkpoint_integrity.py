"""Checkpoints: checksums, atomic writes, resuming past damaged files, retention, disk use."""

import hashlib
import logging
import os

import pytest
import torch
from torch import nn

from insloc_detco.checkpoint import (
    CorruptCheckpointError,
    PeriodicCheckpointer,
    SafeDetectionCheckpointer,
    describe_checkpoint_disk_use,
    estimate_checkpoint_bytes,
    verify_checksum,
)


class _Iteration:
    """Stands in for the trainer, which a checkpoint stores as {"iteration": i}."""

    def __init__(self):
        self.iteration = -1

    def state_dict(self):
        return {"iteration": self.iteration}

    def load_state_dict(self, state):
        self.iteration = state["iteration"]


def _model(value: float) -> nn.Module:
    model = nn.Linear(16, 8)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(value)
    return model


def _save(folder, iteration: int, name: str = None):
    """A checkpoint whose weights are all ``iteration``, as the periodic hook names it."""
    state = _Iteration()
    state.iteration = iteration
    ckpt = SafeDetectionCheckpointer(_model(iteration), str(folder), trainer=state)
    ckpt.save(name or f"model_{iteration:07d}")
    return os.path.join(str(folder), f"{name or f'model_{iteration:07d}'}.pth")


def _resume(folder):
    """Resume a fresh model; returns (weight value, iteration) it resumed to."""
    state = _Iteration()
    model = _model(-1.0)
    SafeDetectionCheckpointer(model, str(folder), trainer=state).resume_or_load("", resume=True)
    return float(model.weight[0, 0]), state.iteration


def _flip(path, offset: int, count: int = 3):
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(count))
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def _truncate(path, size: int):
    with open(path, "r+b") as f:
        f.truncate(size)


def test_save_is_atomic_and_records_sha256(tmp_path):
    path = _save(tmp_path, 4)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    with open(path + ".sha256") as f:
        assert f.read() == f"{digest}  model_0000004.pth\n"  # sha256sum -c format
    assert verify_checksum(path) is True
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth"
    assert sorted(os.listdir(tmp_path)) == [
        "last_checkpoint",
        "model_0000004.pth",
        "model_0000004.pth.sha256",
    ]


@pytest.mark.parametrize("where", [0.0, 0.02, 0.5, 0.97, 1.0])
def test_flipped_bytes_are_refused_when_loading(tmp_path, where):
    path = _save(tmp_path, 3)
    _flip(path, min(int(os.path.getsize(path) * where), os.path.getsize(path) - 3))
    model = _model(-1.0)
    with pytest.raises(CorruptCheckpointError, match="not the file that was saved"):
        SafeDetectionCheckpointer(model).load(path)  # MODEL.WEIGHTS
    assert float(model.weight[0, 0]) == -1.0  # nothing was loaded


def _damage_truncate(path, frac):
    _truncate(path, int(os.path.getsize(path) * frac))


DAMAGES = {
    "empty": lambda p: _truncate(p, 0),
    "truncated_10%": lambda p: _damage_truncate(p, 0.1),
    "truncated_half": lambda p: _damage_truncate(p, 0.5),
    "truncated_last_byte": lambda p: _truncate(p, os.path.getsize(p) - 1),
    "bytes_flipped_middle": lambda p: _flip(p, os.path.getsize(p) // 2),
    "bytes_flipped_end": lambda p: _flip(p, os.path.getsize(p) - 30),
    "deleted": os.remove,
    # Without its .sha256 (e.g. a copy) the damage is found by reading the file.
    "truncated_no_checksum": lambda p: (os.remove(p + ".sha256"), _damage_truncate(p, 0.6)),
    "empty_no_checksum": lambda p: (os.remove(p + ".sha256"), _truncate(p, 0)),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_resume_falls_back_to_the_newest_readable_checkpoint(tmp_path, caplog, damage):
    _save(tmp_path, 1)
    _save(tmp_path, 3)
    last = _save(tmp_path, 5)
    DAMAGES[damage](last)
    with caplog.at_level(logging.WARNING, logger="insloc_detco"):
        value, iteration = _resume(tmp_path)
    assert (value, iteration) == (3.0, 3)
    assert "RESUMING FROM AN OLDER CHECKPOINT" in caplog.text
    assert "model_0000005.pth" in caplog.text


def test_resume_skips_several_damaged_checkpoints_and_a_stale_temporary(tmp_path):
    _save(tmp_path, 1)
    middle = _save(tmp_path, 3)
    last = _save(tmp_path, 5)
    _truncate(middle, 100)
    _flip(last, 200)
    (tmp_path / "model_0000007.pth.tmp-12345").write_bytes(b"half a checkpoint")  # a crash
    assert _resume(tmp_path) == (1.0, 1)


def test_resume_without_last_checkpoint_file_takes_the_newest(tmp_path, caplog):
    _save(tmp_path, 1)
    _save(tmp_path, 3)
    os.remove(tmp_path / "last_checkpoint")
    with caplog.at_level(logging.WARNING, logger="insloc_detco"):
        assert _resume(tmp_path) == (3.0, 3)
    assert "no last_checkpoint" in caplog.text


def test_resume_with_nothing_readable_is_a_clear_error(tmp_path):
    only = _save(tmp_path, 2)
    _truncate(only, 10)
    with pytest.raises(CorruptCheckpointError, match="no readable checkpoint") as e:
        _resume(tmp_path)
    assert "model_0000002.pth" in str(e.value) and "without --resume" in str(e.value)


def test_resume_with_no_checkpoint_starts_from_weights(tmp_path):
    assert _resume(tmp_path) == (-1.0, -1)  # nothing to resume: MODEL.WEIGHTS ("" here)


def test_crash_during_a_write_keeps_the_previous_files(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    before = sorted(os.listdir(tmp_path))

    def crash(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="No space left"):
        _save(tmp_path, 2)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == before  # no temporary file, no new name
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert _resume(tmp_path) == (1.0, 1)


class _FakeTrainer:
    def __init__(self, max_iter):
        self.max_iter = max_iter
        self.iter = 0


def _run_periodic(folder, start, max_iter, period, keep):
    state = _Iteration()
    ckpt = SafeDetectionCheckpointer(_model(0.0), str(folder), trainer=state)
    hook = PeriodicCheckpointer(ckpt, period, max_to_keep=keep)
    hook.trainer = _FakeTrainer(max_iter)
    hook.before_train()
    for it in range(start, max_iter):
        state.iteration = it
        hook.step(it)


def test_periodic_checkpoints_keep_the_newest_and_final_once(tmp_path):
    _run_periodic(tmp_path, 0, 20, period=2, keep=3)
    names = sorted(os.listdir(tmp_path))
    # iterations 1, 3, ..., 17 are periodic; 19 is the last: only model_final.pth, once.
    assert names == [
        "last_checkpoint",
        "model_0000013.pth",
        "model_0000013.pth.sha256",
        "model_0000015.pth",
        "model_0000015.pth.sha256",
        "model_0000017.pth",
        "model_0000017.pth.sha256",
        "model_final.pth",
        "model_final.pth.sha256",
    ]
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"


def test_retention_also_prunes_checkpoints_of_earlier_sessions(tmp_path):
    _run_periodic(tmp_path, 0, 10, period=2, keep=0)  # keep all: 1, 3, 5, 7 + final
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".pth")]) == 5
    # A resumed session with a longer schedule and retention on.
    _run_periodic(tmp_path, 10, 16, period=2, keep=2)
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".pth")) == [
        "model_0000011.pth",
        "model_0000013.pth",
        "model_final.pth",
    ]


def test_estimated_checkpoint_size_matches_the_file(tmp_path):
    model = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.Linear(256, 32))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 64)).sum().backward()
    optimizer.step()  # creates the momentum buffers
    ckpt = SafeDetectionCheckpointer(model, str(tmp_path), optimizer=optimizer)
    ckpt.save("model_final")
    actual = os.path.getsize(tmp_path / "model_final.pth")
    estimate = estimate_checkpoint_bytes(model, optimizer)
    assert 0.9 * actual < estimate < 1.1 * actual


def test_disk_use_line_states_kept_and_total(tmp_path):
    detco, epoch = 1_200_000_000, 5005
    line = describe_checkpoint_disk_use(detco, epoch, 200 * epoch, 0, str(tmp_path))
    assert "~1.2 GB each" in line and "199 periodic" in line and "~240.0 GB" in line
    line = describe_checkpoint_disk_use(detco, epoch, 200 * epoch, 3, str(tmp_path))
    assert "the newest 3 kept" in line and "~4.8 GB" in line
    assert "NOT ENOUGH DISK SPACE" in describe_checkpoint_disk_use(10**18, 1, 10, 3, str(tmp_path))
