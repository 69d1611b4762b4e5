"""
One command per readout protocol (``eval_readout.py {knn,linear,loc,svm,views}``), on the
plumbing every run shares (:mod:`insloc_detco.engine.runs`): check the data and the weights in
the launching process, then extract features and run the protocol (:mod:`.protocols`) in every
launched process (GPUs, or CPU processes over gloo), and write ``results.json`` /
``results.md`` from the main process.
"""

import logging
import os
import time
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.utils import comm

from ..engine.runs import RANDOM_INIT, Launch, default_output_dir, read_json, stamped
from .encoder import STAGES, ReadoutError, WeightsReport, build_readout_encoder
from .features import eval_transform, image_batches
from .localization import grid_boxes
from .protocols import (
    PROTOCOLS,
    ReadoutData,
    ReadoutProtocol,
    ReadoutSettings,
    get_protocol,
    load_readout_data,
)
from .results import merge_results, result_key

__all__ = [
    "PROTOCOLS",
    "ReadoutSettings",
    "ReadoutData",
    "load_readout_data",
    "readout_one",
    "check_inputs",
    "run_readouts",
]

logger = logging.getLogger(__name__)


def _readout_encoder(weights: str, s: ReadoutSettings, d: ReadoutData, p: ReadoutProtocol):
    """The frozen network with ``weights`` (BN re-estimated on training images if asked)."""
    encoder, report = build_readout_encoder(weights, s.layout, s.device, s.seed, s.opts)
    if s.precise_bn > 0:
        boxes = grid_boxes(d.crop, d.crop, s.grid) if p.cell_boxes else None
        transform = eval_transform(d.resize, d.crop)
        batches = image_batches(d.train[: s.precise_bn], transform, s.batch_size, s.num_workers)
        encoder.recompute_bn_statistics(batches, boxes)
    return encoder, report


def _entry(
    weights: str,
    s: ReadoutSettings,
    d: ReadoutData,
    report: WeightsReport,
    metrics: Dict,
    start: float,
) -> Dict:
    """The stamped results.json entry of one readout."""
    per_class = metrics.pop("per_class", None)
    entry = stamped(
        {
            "protocol": s.protocol,
            "weights": weights,
            "weights_loaded": report.summary(),
            "meta_architecture": report.meta_architecture,
            "layout": s.layout,
            "train": s.train,
            "val": s.val,
            "num_train": len(d.train),
            "num_val": len(d.val),
            "num_classes": len(d.classes),
            "input_size": [d.resize, d.crop],
            "metrics": metrics,
            "settings": s.as_dict(),
        },
        start,
    )
    if per_class is not None:
        entry["per_class"] = {"classes": d.classes, **per_class}
    return entry


def readout_one(
    weights: str, s: ReadoutSettings, output_dir: str, data: Optional[ReadoutData] = None
) -> Dict:
    """
    Run one protocol for one weights file in this process (of a launched group).

    Args:
        data: from :func:`load_readout_data` (None: loaded here).
    Returns:
        the result entry (main process; {} elsewhere), also merged into ``output_dir``.
    """
    start = time.perf_counter()
    torch.manual_seed(s.seed)
    protocol = get_protocol(s.protocol)
    if comm.is_main_process():
        os.makedirs(output_dir, exist_ok=True)
    d = data or load_readout_data(s)
    encoder, report = _readout_encoder(weights, s, d, protocol)
    logger.info(
        f"[{s.protocol}] {report.summary()}; {len(d.train)} -> {len(d.val)} images at {d.crop} px"
    )
    metrics = protocol.run(encoder, s, d, output_dir)
    comm.synchronize()
    if not comm.is_main_process():
        return {}
    entry = _entry(weights, s, d, report, metrics, start)
    merge_results(output_dir, {result_key(s.protocol, weights, s.train, s.val, s.layout): entry})
    logger.info(
        f"[{s.protocol}] {os.path.basename(weights)}: "
        + ", ".join(f"{k} {v:.1f}" for k, v in metrics.items())
    )
    return entry


def _worker(weights_list: List[str], s: ReadoutSettings, output_dirs: List[str], data: ReadoutData):
    for weights, out in zip(weights_list, output_dirs):
        readout_one(weights, s, out, data)


def check_inputs(weights_list: Sequence[str], s: ReadoutSettings, load_weights: bool = True):
    """
    Fail in the launching process, before any worker starts: data, weights, settings.
    ``load_weights``: also read every weights file into the readout network (skipped when the
    readout runs in this process anyway).

    Returns:
        the :class:`ReadoutData`, read once here and handed to the launched processes.
    """
    data = load_readout_data(s)  # checks the protocol's name too
    bad = [stage for stage in s.stages if stage not in STAGES]
    if bad:
        raise ReadoutError(f"Unknown stage(s) {bad}; choose from {STAGES}.")
    for w in weights_list:
        if w != RANDOM_INIT and not os.path.isfile(w):
            raise ReadoutError(f"Weights '{w}' do not exist (a .pth, a .pkl, or 'random').")
        if load_weights:
            build_readout_encoder(w, s.layout, "cpu", s.seed, s.opts)
    return data


def run_readouts(
    weights_list: Sequence[str],
    s: ReadoutSettings,
    output_dir: Optional[str] = None,
    launch: Launch = Launch(),
) -> List[Dict]:
    """
    Args:
        weights_list: checkpoints (.pth), converted .pkl files, or "random".
        s: the protocol and its settings.
        output_dir: where results go (None: ``readout/`` next to each weights file).
        launch: the processes (one per GPU, or CPU processes over gloo; several machines).
    Returns:
        the result entries (read back from the output folders), where the launch collects the
        results (:attr:`Launch.collects_results`); elsewhere [].
    """
    data = check_inputs(weights_list, s, load_weights=launch.world_size > 1)
    dirs = [output_dir or default_output_dir(w, "readout") for w in weights_list]
    launch(_worker, list(weights_list), s, dirs, data)
    if not launch.collects_results:
        return []
    return [
        read_json(os.path.join(d, "results.json"))[
            result_key(s.protocol, w, s.train, s.val, s.layout)
        ]
        for w, d in zip(weights_list, dirs)
    ]
