"""Repository tooling: `make clean`, and the set-up script's progress while pip works."""

import os
import shutil
import stat
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_clean_removes_what_commands_create_and_keeps_user_data(tmp_path):
    shutil.copy(os.path.join(REPO, "Makefile"), tmp_path)
    created = [
        "output/demo/pretrain_insloc_fpn/model_final.pth",  # make demo
        "projects/InsLocDetCo/output/pretrain_moco_v2/log.txt",  # README commands, run there
        "datasets/demo_det/images/train/0.jpg",
        "projects/InsLocDetCo/datasets/demo_det/images/train/0.jpg",
        "datasets/demo_cls/train/disk/000000.jpg",  # make demo's readout
        "projects/InsLocDetCo/datasets/demo_cls/val/disk/002000.jpg",
    ]
    users = ["datasets/imagenet/train/n01/a.JPEG"]
    for rel in created + users:
        os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    subprocess.run(["make", "clean"], cwd=tmp_path, check=True, capture_output=True)
    for rel in created:
        assert not (tmp_path / rel).exists(), rel
    assert not (tmp_path / "projects/InsLocDetCo/datasets").exists()  # emptied: removed
    for rel in users:
        assert (tmp_path / rel).exists(), rel


STUB_PIP = """#!/usr/bin/env bash
echo "Collecting torch==2.14.1"
echo "  Downloading torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl (900.1 MB)"
echo "Requirement already satisfied: numpy"
sleep 2
echo "Installing collected packages: torch"
if [ "$STUB_FAIL" = 1 ]; then echo "ERROR: No matching distribution found for torch"; exit 1; fi
echo "Successfully installed torch-2.14.1"
"""


def _pip_install(tmp_path, fail):
    stub = tmp_path / "python"
    stub.write_text(STUB_PIP)
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    script = (
        f"set -euo pipefail; VPY={stub}; PIP_LOG={tmp_path}/pip.log; PIP_HEARTBEAT_S=1; "
        f"source {REPO}/scripts/pip_install.sh; pip_install 'installing torch' torch"
    )
    env = dict(os.environ, STUB_FAIL=str(int(fail)))
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env)


@pytest.mark.slow
def test_setup_shows_pip_progress_without_flooding(tmp_path):
    proc = _pip_install(tmp_path, fail=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "[setup] installing torch ..."
    assert "[setup]   Downloading torch-2.14.1-cp311" in proc.stdout
    assert "[setup]   ... pip still working (1 s)" in proc.stdout  # heartbeat while pip is quiet
    assert lines[-1].startswith("[setup] installing torch: done in")
    assert "Requirement already satisfied" not in proc.stdout  # in the log file only
    assert "Requirement already satisfied" in (tmp_path / "pip.log").read_text()


@pytest.mark.slow
def test_setup_shows_the_end_of_pip_log_when_pip_fails(tmp_path):
    proc = _pip_install(tmp_path, fail=True)
    assert proc.returncode == 1
    assert "pip failed while installing torch" in proc.stderr
    assert "ERROR: No matching distribution found for torch" in proc.stderr
