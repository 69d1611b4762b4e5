import os
import shutil
import sys

import pytest
import torch
from detectron2.config import get_cfg

from insloc_detco import add_insloc_detco_config
from insloc_detco.engine import resolve_config_file

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for `import insloc_testing`

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def load_config(name: str, *opts):
    """A frozen-able config from ``configs/<name>`` with our keys, plus ``KEY VALUE`` opts."""
    cfg = get_cfg()
    add_insloc_detco_config(cfg)
    cfg.merge_from_file(resolve_config_file(name))
    cfg.merge_from_list(list(opts))
    return cfg


@pytest.fixture
def cfg_loader():
    return load_config


@pytest.fixture(scope="module")
def module_folder(tmp_path_factory, request):
    """``module_folder(name)`` makes a folder for the module's shared fixtures. All of them go
    after the module's last test, so the session holds one module's full-size checkpoints
    (~0.3 GB each) on disk at a time, not every module's (tests' own ``tmp_path`` folders go
    when they pass: pyproject's tmp_path_retention_policy)."""
    root = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])

    def make(name: str):
        path = root / name
        path.mkdir(parents=True)
        return path

    yield make
    shutil.rmtree(root, ignore_errors=True)
