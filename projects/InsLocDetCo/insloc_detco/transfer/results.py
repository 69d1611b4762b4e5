"""
Per-trial results -> mean +- std over trials -> ``results.json`` and a Markdown table.

Columns: box AP, AP50, AP75 (VOC evaluator: its own AP over IoU 0.5:0.95, AP50, AP75; COCO
evaluator: COCO AP); where the detector predicts masks, the mask AP and AP50 (``APmask``,
``APmask50``; COCO's, or cityscapesScripts' for Cityscapes, which reports no box AP); where it
predicts keypoints, COCO's keypoint AP, AP50, AP75 (``APkp``...). A table shows the columns
that some benchmark in it reports.
"""

import os
from collections import OrderedDict
from typing import Dict, List

from ..engine.runs import format_mean_std, mean_std

__all__ = ["COLUMNS", "summarize", "markdown_table"]

# Column name -> (evaluator task, metric).
COLUMNS = OrderedDict(
    [
        ("AP", ("bbox", "AP")),
        ("AP50", ("bbox", "AP50")),
        ("AP75", ("bbox", "AP75")),
        ("APmask", ("segm", "AP")),
        ("APmask50", ("segm", "AP50")),
        ("APkp", ("keypoints", "AP")),
        ("APkp50", ("keypoints", "AP50")),
        ("APkp75", ("keypoints", "AP75")),
    ]
)


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
    columns = [c for c in COLUMNS if any(c in r["summary"] for r in results.values())]
    header = ["benchmark", "weights", "trials", *columns, "machine", "date"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in results.items():
        cells = [format_mean_std(r["summary"].get(c), missing="") for c in columns]
        row = [
            name,
            os.path.basename(r["weights"]),
            str(len(r["trials"])),
            *cells,
            r["machine"],
            r["date"],
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
