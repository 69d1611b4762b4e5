"""A full disk says so: what failed, which checkpoint is intact, how much space is needed."""

import errno
import os
import subprocess
import sys

import pytest
import torch
from insloc_testing import PROJECT_DIR

from insloc_detco.checkpoint import DiskFullError, SafeDetectionCheckpointer, integrity


def _fill_disk_after(monkeypatch, nbytes):
    """Writes through the checkpoint writer fail with ENOSPC after ``nbytes`` (as on a full
    tmpfs; torch's zip writer then raises 'unexpected pos' itself)."""
    original = integrity._HashingWriter.write
    state = {"written": 0}

    def write(self, data):
        state["written"] += len(data)
        if state["written"] > nbytes:
            self.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise self.error
        return original(self, data)

    monkeypatch.setattr(integrity._HashingWriter, "write", write)


def test_a_full_disk_leaves_no_partial_file_and_names_the_intact_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(256, 256)
    ckpt = SafeDetectionCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000004", iteration=4)
    before = sorted(os.listdir(tmp_path))
    _fill_disk_after(monkeypatch, 10_000)
    with pytest.raises(DiskFullError) as e:
        ckpt.save("model_0000009", iteration=9)
    message = str(e.value)
    assert e.value.errno == errno.ENOSPC and "\n" not in message
    assert "No space left on device" in message
    assert f"the last complete checkpoint is {tmp_path}/model_0000004.pth" in message
    assert "A checkpoint needs ~263 kB" in message  # the weight and bias of Linear(256, 256)
    assert sorted(os.listdir(tmp_path)) == before  # no partial file, no stale checksum
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth"


def test_a_full_disk_before_any_checkpoint(tmp_path, monkeypatch):
    ckpt = SafeDetectionCheckpointer(torch.nn.Linear(4, 4), str(tmp_path))
    _fill_disk_after(monkeypatch, 0)
    with pytest.raises(DiskFullError, match=r"\(none: no checkpoint yet\)"):
        ckpt.save("model_0000000", iteration=0)
    assert os.listdir(tmp_path) == []


_DRIVER = """
import errno, os, runpy, sys
from insloc_detco.checkpoint import integrity
original = integrity._HashingWriter.write
def write(self, data):
    if "model_0000003" in self._f.name:  # the second checkpoint does not fit
        self.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise self.error
    return original(self, data)
integrity._HashingWriter.write = write
sys.argv = ["train_net.py"] + sys.argv[1:]
runpy.run_path("train_net.py", run_name="__main__")
"""


@pytest.mark.slow
def test_train_net_ends_on_one_line_that_says_what_happened(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _DRIVER,
            "--config-file",
            "instant_test/pretrain_moco_v2.yaml",
            "SOLVER.MAX_ITER",
            "6",
            "SOLVER.CHECKPOINT_PERIOD",
            "2",
            "OUTPUT_DIR",
            str(out),
        ],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("insloc_detco.checkpoint.integrity.DiskFullError: [Errno 28]"), last
    assert "No space left on device" in last and f"{out}/model_0000001.pth" in last
    assert "needs ~" in last and "run the same command again" in last
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not [f for f in os.listdir(out) if "model_0000003" in f]
