"""
Per-trial results -> mean +- std over trials -> ``results.json`` and a Markdown table.

Columns: box AP, AP50, AP75 (VOC evaluator: its own AP over IoU 0.5:0.95, AP50, AP75; COCO
evaluator: COCO AP); where the detector predicts masks, the mask AP and AP50 (``APmask``,
``APmask50``; COCO's, or cityscapesScripts' for Cityscapes, which reports no box AP); where it
predicts keypoints, COCO's keypoint AP, AP50, AP75 (``APkp``...). A table shows the columns
that some benchmark in it reports.
"""

import json
import math
import os
import platform
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "COLUMNS",
    "machine_description",
    "mean_std",
    "format_mean_std",
    "summarize",
    "markdown_table",
    "write_json",
    "merge_results_files",
]

# Column name -> (evaluator task, metric).
COLUMNS = OrderedDict(
    [("AP", ("bbox", "AP")), ("AP50", ("bbox", "AP50")), ("AP75", ("bbox", "AP75")),
     ("APmask", ("segm", "AP")), ("APmask50", ("segm", "AP50")),
     ("APkp", ("keypoints", "AP")), ("APkp50", ("keypoints", "AP50")),
     ("APkp75", ("keypoints", "AP75"))]
)  # fmt: skip


def machine_description() -> str:
    """e.g. '8x NVIDIA A100-SXM4-40GB' or 'CPU x86_64 (16 cores)'; no host names."""
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"{n}x {torch.cuda.get_device_name(0)}"
    return f"CPU {platform.machine()} ({os.cpu_count()} cores)"


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _clean(x):
    """JSON-safe: numpy scalars to float, NaN to None."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_json(path: str, data: Dict):
    """Atomic write: a trial's results.json is its 'finished' marker."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_clean(data), f, indent=2)
    os.replace(tmp, path)


def summarize(trials: List[Dict]) -> Dict[str, Dict]:
    """
    Args:
        trials: per-trial dicts with ``metrics`` = ``{"bbox": {"AP": ...}, "segm": {...}}``.
    Returns:
        column -> {"mean", "std" (sample std; None for one trial), "n", "values"}, for the
        columns that every trial reports.
    """
    out = OrderedDict()
    for column, (task, metric) in COLUMNS.items():
        values = [t["metrics"].get(task, {}).get(metric) for t in trials]
        if not values or any(v is None for v in values):
            continue
        out[column] = mean_std(values)
    return out


def mean_std(values: Sequence[float]) -> Dict:
    """{"mean", "std" (sample std; None for one value), "n", "values"}."""
    values = [float(v) for v in values]
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
        "n": len(values),
        "values": values,
    }


def format_mean_std(stat: Optional[Dict], missing: str = "n/a") -> str:
    """A :func:`mean_std` as "m ± s" (one decimal; "m" for one value; ``missing`` for None)."""
    if stat is None:
        return missing
    if stat["std"] is None:
        return f"{stat['mean']:.1f}"
    return f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def markdown_table(results: Dict[str, Dict]) -> str:
    """
    Args:
        results: benchmark name -> {"summary": summarize(...), "trials": [...], "machine",
            "date", "weights", ...} (the content of results.json).
    """
    columns = [c for c in COLUMNS if any(c in r["summary"] for r in results.values())]
    header = ["benchmark", "weights", "trials", *columns, "machine", "date"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in results.items():
        cells = [format_mean_std(r["summary"].get(c), missing="") for c in columns]
        row = [name, os.path.basename(r["weights"]), str(len(r["trials"])), *cells,
               r["machine"], r["date"]]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def merge_results_files(
    output_dir: str, entries: Dict[str, Dict], render: Callable[[Dict[str, Dict]], str]
) -> str:
    """
    Merge ``entries`` into ``<output_dir>/results.json`` (entries of earlier runs are kept,
    same keys replaced) and rewrite ``results.md`` as ``render(merged)``.

    Returns:
        the Markdown written.
    """
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "results.json")
    merged = {}
    if os.path.isfile(path):
        with open(path) as f:
            merged = json.load(f)
    merged.update(entries)
    write_json(path, merged)
    text = render(merged)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(text)
    return text
