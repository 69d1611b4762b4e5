"""
What both mini benchmarks run (``mini_benchmark.py``: frozen-feature readouts,
``mini_transfer.py``: detection fine-tuning): each method's pretraining at a small budget and
the ``demo_det`` fine-tune, each a subprocess (``train_net.py``, ``eval_transfer.py``) whose
console goes to a log file, and the table of mean ± std per method.
"""

import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, PROJECT_DIR)

# name -> the instant-test recipe (its full-scale parent holds the method); a study's budget
# flags override its size, schedule and data. "random": no pretraining.
METHODS = {
    "random": None,
    "moco_v2": "instant_test/pretrain_moco_v2.yaml",
    "insloc_c4": "instant_test/pretrain_insloc_c4.yaml",
    "insloc_fpn": "instant_test/pretrain_insloc_fpn.yaml",
    "detco": "instant_test/pretrain_detco.yaml",
}
FINETUNE_BENCHMARK = "demo_coco_fpn"  # Mask R-CNN R50-FPN on the generated demo_det set


def parse_methods(text: str) -> List[str]:
    """A comma-separated subset of :data:`METHODS`; exits naming an unknown one."""
    methods = [m for m in text.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"Unknown method(s) {unknown}; choose from {list(METHODS)}")
    return methods


class StudyLog:
    """Timestamped progress lines of a study, with the time since it began."""

    def __init__(self, name: str):
        self.name = name
        self.start = time.time()

    def __call__(self, msg: str):
        elapsed = time.time() - self.start
        print(f"[{self.name} {time.strftime('%H:%M:%S')} +{elapsed:5.0f}s] {msg}", flush=True)

    def wall(self) -> int:
        return round(time.time() - self.start)


def run_logged(cmd: Sequence[str], log_file: str, what: str, threads: Optional[int] = None):
    """Run ``cmd`` in the project folder, its output appended to ``log_file``; raise with the
    log's tail on failure. ``threads``: OMP threads of the run (runs side by side share cores)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log_file, "a") as f:
        proc = subprocess.run(cmd, cwd=PROJECT_DIR, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(log_file) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}); see {log_file}:\n{tail}")


def pretrain_command(
    method: str,
    out: str,
    dataset: str,
    iters: int,
    batch: int,
    lr: float,
    queue_size: int,
    device: str,
    num_gpus: int,
    checkpoint_period: int,
    opts: Sequence[str] = (),
) -> List[str]:
    """``train_net.py`` for ``method``'s recipe at this budget on ``dataset``, plus ``opts``."""
    return [
        sys.executable,
        "train_net.py",
        "--config-file",
        METHODS[method],
        "--resume",
        "--num-gpus",
        str(num_gpus),
        "MODEL.DEVICE",
        device,
        "DATASETS.TRAIN",
        f"('{dataset}',)",
        "SOLVER.MAX_ITER",
        str(iters),
        "SOLVER.IMS_PER_BATCH",
        str(batch),
        "SOLVER.BASE_LR",
        str(lr),
        "SOLVER.CHECKPOINT_PERIOD",
        str(checkpoint_period),
        "SOLVER.LOG_PERIOD",
        "10",
        "MODEL.CONTRAST.QUEUE_SIZE",
        str(queue_size),
        "DATALOADER.NUM_WORKERS",
        "1",
        "OUTPUT_DIR",
        out,
        *opts,
    ]


def pretrain(cmd: List[str], out: str, what: str, threads: Optional[int] = None, log=None) -> str:
    """Run (or find) one pretraining run writing into ``out``; returns its final checkpoint.
    ``log``: told when the run finished earlier."""
    final = os.path.join(out, "model_final.pth")
    if os.path.isfile(final):
        if log:
            log(f"{what}: finished earlier ({final})")
        return final
    os.makedirs(out, exist_ok=True)
    run_logged(cmd, os.path.join(out, "stdout.txt"), what, threads)
    return final


def finetune(
    weights: str,
    out: str,
    iters: int,
    batch: int,
    lr: float,
    trials: int,
    seed: int,
    device: str,
    num_gpus: int,
    threads: Optional[int] = None,
) -> Dict:
    """``eval_transfer.py run`` of :data:`FINETUNE_BENCHMARK` (``trials`` seeds from ``seed``);
    returns its results.json entry (``summary``: mean ± std per column, ``trials``)."""
    os.makedirs(out, exist_ok=True)
    cmd = [
        sys.executable,
        "eval_transfer.py",
        "run",
        weights,
        "--benchmark",
        FINETUNE_BENCHMARK,
        "--trials",
        str(trials),
        "--seed",
        str(seed),
        "--output-dir",
        out,
        "--num-gpus",
        str(num_gpus),
        "MODEL.DEVICE",
        device,
        "SOLVER.MAX_ITER",
        str(iters),
        "SOLVER.STEPS",
        f"({int(iters * 0.75)},)",
        "SOLVER.WARMUP_ITERS",
        str(max(1, iters // 10)),
        "SOLVER.IMS_PER_BATCH",
        str(batch),
        "SOLVER.BASE_LR",
        str(lr),
    ]
    run_logged(cmd, os.path.join(out, "stdout.txt"), f"fine-tuning {weights}", threads)
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)[FINETUNE_BENCHMARK]


def table(stats: Dict[str, Dict[str, Dict]], columns: Sequence[str], seeds: Dict[str, int]):
    """
    Args:
        stats: method -> column -> ``mean_std`` (a missing column shows "n/a").
        seeds: method -> the number of seeds behind its row.
    Returns:
        a Markdown table, a row per method.
    """
    from insloc_detco.engine.runs import format_mean_std

    lines = [
        "| pretraining | " + " | ".join(columns) + " | seeds |",
        "|---" * (len(columns) + 2) + "|",
    ]
    for method, s in stats.items():
        cells = [format_mean_std(s.get(c)) for c in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {seeds[method]} |")
    return "\n".join(lines)


def write_study(output_dir: str, name: str, md: str, settings: Dict, wall: int, **results):
    """``<name>.md`` (the table, the settings, the wall time) and ``results.json``
    (``settings``, ``results``, ``wall_s``)."""
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump({"settings": settings, **results, "wall_s": wall}, f, indent=2)
    with open(os.path.join(output_dir, f"{name}.md"), "w") as f:
        f.write(md + "\n\n" + json.dumps(settings) + f"\nwall {wall} s\n")
