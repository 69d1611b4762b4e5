"""
Per-trial results -> mean +- std over trials -> ``results.json`` and a Markdown table.

Columns: box AP, AP50, AP75 (VOC evaluator: its own AP over IoU 0.5:0.95, AP50, AP75; COCO
evaluator: COCO AP) and, where the detector predicts masks, the mask AP (``APmask``).
"""

import os
from collections import OrderedDict
from typing import Dict, List

from ..engine.runs import format_mean_std, mean_std

__all__ = ["COLUMNS", "summarize", "markdown_table"]

# Column name -> (evaluator task, metric).
COLUMNS = OrderedDict(
    [("AP", ("bbox", "AP")), ("AP50", ("bbox", "AP50")), ("AP75", ("bbox", "AP75")),
     ("APmask", ("segm", "AP"))]
)  # fmt: skip


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


def markdown_table(results: Dict[str, Dict]) -> str:
    """
    Args:
        results: benchmark name -> {"summary": summarize(...), "trials": [...], "machine",
            "date", "weights", ...} (the content of results.json).
    """
    lines = [
        "| benchmark | weights | trials | " + " | ".join(COLUMNS) + " | machine | date |",
        "|---|---|---|" + "---|" * len(COLUMNS) + "---|---|",
    ]
    for name, r in results.items():
        s = r["summary"]
        cells = [format_mean_std(s.get(c), missing="") for c in COLUMNS]
        lines.append(
            f"| {name} | {os.path.basename(r['weights'])} | {len(r['trials'])} | "
            + " | ".join(cells)
            + f" | {r['machine']} | {r['date']} |"
        )
    return "\n".join(lines) + "\n"
