"""
One command from a pretraining checkpoint to a results table (``eval_transfer.py run``).

For each benchmark: convert the weights (any layout :mod:`.formats` recognises) for the
benchmark's detector, keeping what that detector uses (:func:`.converter.fit_to_detector`),
check that the data sets can be read and that every converted tensor loads, then fine-tune and
evaluate ``trials`` times with seeds ``seed, seed + 1, ...`` (detectron2 ``launch``: one
process per GPU, any number of machines; the processes of torchrun or srun; or a SLURM job per
trial), on the plumbing every run shares (:mod:`insloc_detco.engine.runs`). Layout of the
output folder::

    <output>/weights/<run>_<checkpoint>_<layout>.pkl   converted weights
    <output>/<benchmark>/trial<i>/                     detectron2 run: config.yaml (fully
        resolved), inputs.json (weights digest), log.txt, metrics.json, model_final.pth,
        results.json (= trial finished), submitit/ (a SLURM job's stdout/stderr)
    <output>/results.json, <output>/results.md         mean +- std over trials, all benchmarks

Re-running the command skips finished trials and resumes unfinished ones from their last
checkpoint, if they were started with the same config and weights (:mod:`.trial_state`; else
it stops, or with ``force`` starts them again). With several machines the output folder must
be shared (as for checkpoints).
"""

import logging
import os
import time
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from ..data.datasets import try_register
from ..engine import resolve_device
from ..engine.log_setup import log_to_file
from ..engine.runs import (
    RANDOM_INIT,
    Launch,
    merge_results_files,
    read_json,
    stamped,
    write_json,
)
from .benchmarks import Benchmark
from .box_head_choice import box_head_for_weights
from .config import load_transfer_config
from .converter import (
    ConversionError,
    convert_checkpoint,
    fit_to_detector,
    load_model_zoo_pkl,
    save_model_zoo_pkl,
    target_of_config,
)
from .evaluators import evaluation_problems
from .fitting import match_model_zoo_file
from .results import markdown_table, summarize
from .trainer import TransferTrainer
from .trial_state import file_sha256, prepare_trial_dir

__all__ = [
    "TransferError",
    "detector_state",
    "prepare_weights",
    "check_datasets",
    "check_weights",
    "run_benchmarks",
]

logger = logging.getLogger(__name__)


class TransferError(RuntimeError):
    """A problem with the inputs of a transfer run (data, weights, launch settings)."""


# ------------------------------------------------------------------------------------------
# Checks done once, in the launching process, before any GPU is busy
# ------------------------------------------------------------------------------------------
def detector_state(cfg) -> Dict[str, torch.Tensor]:
    """The state dict of the detector ``cfg`` builds (on the CPU: no GPU is busy yet)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    return build_model(cfg).state_dict()


def prepare_weights(weights: str, cfg, output_dir: str, model_state=None) -> str:
    """
    Args:
        weights: any checkpoint :mod:`.formats` recognises (ours, MoCo, InstanceLoc, DenseCL,
            torchvision, a detectron2 ``.pkl`` / ``.pth``...), or ``"random"`` (no
            pretraining: the detector's own initialisation).
        cfg: the benchmark's config.
        model_state: :func:`detector_state` of ``cfg`` (built if None).
    Returns:
        path of a ``.pkl`` with exactly what this detector uses ("" for random init).
    """
    if weights == RANDOM_INIT:
        return ""
    target = target_of_config(cfg)
    converted, info = convert_checkpoint(weights, target)
    if model_state is None:
        model_state = detector_state(cfg)
    conversion = fit_to_detector(converted, model_state)
    # A benchmark whose detector leaves a pretrained group out gets its own file.
    dropped = [
        group
        for group, prefix in (("fpn", "backbone.fpn_"), ("box_head", "roi_heads.box_head."))
        if any(k.startswith(prefix) for k in converted.model)
        and not any(k.startswith(prefix) for k in conversion.model)
    ]
    stem = os.path.basename(weights)
    while os.path.splitext(stem)[1] in (".tar", ".pth", ".pt", ".pkl"):  # x.pth.tar -> x
        stem = os.path.splitext(stem)[0]
    run = os.path.basename(os.path.dirname(os.path.abspath(weights)))
    name = f"{run}_{stem}_{target}" + "".join(f"_no-{g}" for g in dropped) + ".pkl"
    path = os.path.join(output_dir, "weights", name)
    save_model_zoo_pkl(conversion, path, source=info["source"], iteration=info["iteration"])
    logger.info(conversion.table() + f"\nWrote {path}")
    return path


def check_datasets(cfg, num_machines: int = 1) -> Dict[str, int]:
    """Check what the evaluators and the task need (:func:`.evaluators.evaluation_problems`),
    then load every train and test set once; returns name -> number of images."""
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    for name in names:
        if not try_register(name):
            raise TransferError(
                f"Dataset '{name}' is not registered (builtin names resolve under "
                "$DETECTRON2_DATASETS, see detectron2's datasets/README.md)."
            )
    problems = evaluation_problems(cfg, num_machines)
    if problems:
        raise TransferError(" ".join(problems))
    counts = {}
    for name in names:
        meta = MetadataCatalog.get(name)
        source = (
            meta.get("json_file", None)
            or meta.get("dirname", None)
            or meta.get("gt_dir", None)
            or "its loader"
        )
        try:
            dicts = DatasetCatalog.get(name)
        except Exception as e:
            raise TransferError(
                f"Cannot read the annotations of dataset '{name}' ({source}): "
                f"{type(e).__name__}: {e}"
            ) from e
        if not dicts:
            raise TransferError(f"Dataset '{name}' ({source}) has no images.")
        counts[name] = len(dicts)
    return counts


def check_weights(cfg, pkl: str, model_state=None) -> Dict[str, int]:
    """
    Match the ``.pkl`` against the detector the way ``DetectionCheckpointer`` will
    (:func:`.fitting.match_weights`): every tensor of the file must load, and the detector's
    ResNet must come from it completely.

    Args:
        model_state: :func:`detector_state` of ``cfg`` (built if None).
    Returns:
        {"loaded", "model"}: tensor counts.
    Raises:
        TransferError: a tensor would not be used or has the wrong shape, or the detector's
            ResNet would stay partly randomly initialised.
    """
    model_state = model_state if model_state is not None else detector_state(cfg)
    try:
        data = load_model_zoo_pkl(pkl)
        match = match_model_zoo_file(model_state, data, pkl, "the detector of this benchmark")
    except ConversionError as e:
        raise TransferError(str(e)) from None
    return {"loaded": len(match.loaded), "model": len(model_state)}


# ------------------------------------------------------------------------------------------
# One trial, in every launched process
# ------------------------------------------------------------------------------------------
def run_trial(cfg, trial_info: Dict):
    """
    Fine-tune and evaluate once (called by ``launch`` in each process). The main process
    writes ``<OUTPUT_DIR>/results.json``.
    """
    rank = comm.get_rank()
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        try_register(name)  # spawned processes start with the builtin names only
    log_file = "log.txt" if rank == 0 else f"log.txt.rank{rank}"
    start = time.perf_counter()
    with log_to_file(os.path.join(cfg.OUTPUT_DIR, log_file)):
        seed_all_rng(cfg.SEED + rank)
        trainer = TransferTrainer(cfg)
        trainer.resume_or_load(resume=True)  # continue an interrupted trial
        trainer.train()
        metrics = getattr(trainer, "_last_eval_results", None)
    if comm.is_main_process():
        if not metrics:
            raise TransferError(f"Trial in {cfg.OUTPUT_DIR} produced no evaluation results.")
        result = stamped({**trial_info, "metrics": metrics}, start)
        write_json(os.path.join(cfg.OUTPUT_DIR, "results.json"), result)
    comm.synchronize()


# ------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------
def _trial_config(base_cfg, pkl: str, trial_dir: str, seed: int):
    cfg = base_cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = pkl
    cfg.OUTPUT_DIR = trial_dir
    cfg.SEED = seed
    resolve_device(cfg)
    cfg.freeze()
    return cfg


def _prepare_benchmark(
    bench: Benchmark, weights: str, output_dir: str, opts: Sequence[str], launch: Launch
):
    """
    The checks of one benchmark, in the launching process: its config, the weights converted
    for its detector (every tensor loads), its data sets and evaluators.

    Returns:
        (config, path of the converted ``.pkl``: "" for random init).
    """
    cfg = load_transfer_config(bench.config, opts)
    cfg = box_head_for_weights(cfg, weights, opts)  # InsLoc's FPN protocol: head per source
    pkl, source = "", "random initialisation (no pretrained tensor)"
    if weights != RANDOM_INIT:
        model_state = detector_state(cfg)
        pkl = prepare_weights(weights, cfg, output_dir, model_state)
        report = check_weights(cfg, pkl, model_state)
        source = f"{report['loaded']} of the detector's {report['model']} tensors come from "
        source += os.path.basename(pkl)
    counts = check_datasets(cfg, launch.machines)
    logger.info(f"[{bench.name}] {source}; data: {counts}")
    return cfg, pkl


def _run_trials(
    bench: Benchmark,
    cfg,
    pkl: str,
    trials: int,
    seed: int,
    output_dir: str,
    launch: Launch,
    force: bool,
) -> List[str]:
    """Run trials ``0..trials-1`` (seeds ``seed + t``), skipping those finished earlier; with
    a submitting launch, each unfinished trial is a SLURM job instead (logs in its
    ``submitit/``). Returns their results.json files."""
    weights_sha256 = file_sha256(pkl)
    files = []
    for t in range(trials):
        trial_dir = os.path.join(output_dir, bench.name, f"trial{t}")
        files.append(os.path.join(trial_dir, "results.json"))
        trial_cfg = _trial_config(cfg, pkl, trial_dir, seed + t)
        try:
            state = prepare_trial_dir(
                trial_dir, trial_cfg.dump(), weights_sha256, force, write=launch.collects_results
            )
        except ValueError as e:
            raise TransferError(f"[{bench.name}] trial {t}: {e}") from None
        if state == "finished":
            logger.info(f"[{bench.name}] trial {t}: finished earlier, skipped ({files[-1]})")
            continue
        solver = trial_cfg.SOLVER
        info = {
            "benchmark": bench.name,
            "trial": t,
            "seed": seed + t,
            "weights": pkl,
            "config": bench.config,
            "max_iter": solver.MAX_ITER,
            "ims_per_batch": solver.IMS_PER_BATCH,
            "base_lr": solver.BASE_LR,
        }
        logger.info(f"[{bench.name}] trial {t} ({state}): seed {seed + t}, {trial_dir}")
        if launch.submits:
            folder = os.path.join(trial_dir, "submitit")
            job = launch.submit(folder, f"{bench.name}-trial{t}", run_trial, trial_cfg, info)
            logger.info(f"[{bench.name}] trial {t}: submitted as SLURM job {job} ({folder})")
            continue
        launch(run_trial, trial_cfg, info)
    return files


def run_benchmarks(
    weights: str,
    benchmarks: Sequence[Benchmark],
    output_dir: str,
    trials: Optional[int] = None,
    seed: int = 1,
    opts: Sequence[str] = (),
    launch: Launch = Launch(),
    force: bool = False,
) -> Dict[str, Dict]:
    """
    Args:
        weights: any checkpoint :mod:`.formats` recognises (a pretraining checkpoint, a
            converted or model-zoo ``.pkl``...), or "random".
        benchmarks: what to run, in order.
        output_dir: where runs and tables go.
        trials: fine-tunes per benchmark (None: each benchmark's default).
        seed: seed of the first trial; trial i uses ``seed + i``.
        opts: ``KEY VALUE`` config overrides for every benchmark.
        launch: the processes of each trial (one per GPU; several machines), or a SLURM job
            per trial (``launch.submits``).
        force: start again a trial that was started with another config or weights (see
            :mod:`.trial_state`); else that is an error.
    Returns:
        benchmark name -> results (as written to ``results.json``; where the launch collects
        results), for the benchmarks whose trials have all finished.
    """
    os.makedirs(output_dir, exist_ok=True)
    all_results: Dict[str, Dict] = {}
    for bench in benchmarks:
        cfg, pkl = _prepare_benchmark(bench, weights, output_dir, opts, launch)
        n = trials or bench.trials
        files = _run_trials(bench, cfg, pkl, n, seed, output_dir, launch, force)
        if not launch.collects_results:
            continue
        if launch.submits and not all(os.path.isfile(f) for f in files):
            continue  # trials run as SLURM jobs: a later run without --slurm tabulates them
        done = [read_json(f) for f in files]
        all_results[bench.name] = {
            "benchmark": bench.name,
            "config": bench.config,
            "target": target_of_config(cfg),
            "weights": pkl or RANDOM_INIT,
            "trials": done,
            "summary": summarize(done),
            "machine": done[-1]["machine"],
            "date": done[-1]["date"],
        }
        table = merge_results_files(output_dir, all_results, markdown_table)
        logger.info(f"Results ({os.path.join(output_dir, 'results.json')}):\n{table}")
    return all_results
