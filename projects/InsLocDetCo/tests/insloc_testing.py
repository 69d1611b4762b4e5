"""Helpers shared by the tests."""

import contextlib
import json
import os
import subprocess
import sys
from typing import Iterable
from unittest import mock

from detectron2.data import DatasetCatalog, MetadataCatalog

from insloc_detco.engine import launch
from insloc_detco.modeling.contrastive import info_nce
from insloc_detco.modeling.meta_arch import base

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The photometric augmentation switched off: tests of reading and geometry compare pixels.
NO_PHOTOMETRIC = (
    "INPUT.PRETRAIN.COLOR_JITTER_PROB",
    0.0,
    "INPUT.PRETRAIN.GRAYSCALE_PROB",
    0.0,
    "INPUT.PRETRAIN.BLUR_PROB",
    0.0,
)


def tiny_finetune(iterations: int = 4) -> list:
    """Overrides that make one demo fine-tuning trial take seconds: ``iterations`` steps, the lr
    step before the last, one warm-up iteration, one PreciseBN batch."""
    return [
        "SOLVER.MAX_ITER",
        str(iterations),
        "SOLVER.STEPS",
        f"({iterations - 1},)",
        "SOLVER.WARMUP_ITERS",
        "1",
        "TEST.PRECISE_BN.NUM_ITER",
        "1",
    ]


def run_distributed(fn, world_size: int = 2, args=()):
    """Run ``fn(*args)`` in ``world_size`` CPU processes over gloo (detectron2's launch).
    ``fn`` must be a module-level function; raise inside it to fail the test."""
    launch(fn, world_size, num_machines=1, machine_rank=0, dist_url="auto", args=args)


def write_rank_and_world(folder: str):
    """In every process of a run: ``<folder>/rank<r>.json`` with its rank and world size (what
    a test of a launch checks)."""
    from detectron2.utils import comm

    with open(os.path.join(folder, f"rank{comm.get_rank()}.json"), "w") as f:
        json.dump({"rank": comm.get_rank(), "world_size": comm.get_world_size()}, f)


def run_train_net(*argv, timeout=600):
    """Run ``train_net.py`` as a user would; returns the CompletedProcess (check=True)."""
    cmd = [sys.executable, os.path.join(PROJECT_DIR, "train_net.py"), *map(str, argv)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        cmd, cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@contextlib.contextmanager
def registered_for_the_test(names: Iterable[str]):
    """Remove the data sets ``names`` from detectron2's catalogs when the block ends, so that a
    test's registrations (e.g. under a temporary root) do not outlive it."""
    try:
        yield
    finally:
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


class TermSpy:
    """Records what each InfoNCE term (``info_nce``, called by ``model.info_nce_terms`` in the
    order of ``model.contrast_terms``) and ``model.encode_keys`` saw and returned."""

    def __init__(self, model):
        self.calls, self.keys = {}, None
        info_nce_terms, encode_keys = model.info_nce_terms, model.encode_keys

        def spy_info_nce_terms(q, k, negatives):
            terms = iter(model.contrast_terms)

            def spy_info_nce(q, k, negatives, temperature):
                loss, logits = info_nce(q, k, negatives, temperature)
                record = {"k": k.detach().clone(), "negatives": negatives, "loss": loss}
                self.calls[next(terms).metric] = record
                return loss, logits

            with mock.patch.object(base, "info_nce", spy_info_nce):
                return info_nce_terms(q, k, negatives)

        def spy_encode_keys(*inputs):
            self.keys = encode_keys(*inputs)
            return self.keys

        model.info_nce_terms, model.encode_keys = spy_info_nce_terms, spy_encode_keys
