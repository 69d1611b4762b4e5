import os
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
