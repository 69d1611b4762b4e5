"""
Readout results -> ``results.json`` (one entry per protocol, weights and data) and
``results.md`` (one Markdown table per protocol), through the results files every run writes
(:mod:`insloc_detco.engine.runs`).
"""

import os
from collections import OrderedDict
from typing import Dict

from ..engine.runs import RANDOM_INIT, merge_results_files

__all__ = [
    "METRIC_COLUMNS",
    "COLUMN_LABELS",
    "result_key",
    "merge_results",
    "markdown_tables",
    "comparison_table",
]

# Protocol -> the metrics its table shows, in order (others stay in results.json).
METRIC_COLUMNS = OrderedDict(
    [
        ("knn", ["top1@k20", "top1@k200", "top5@k20", "top5@k200"]),
        ("linear", ["top1", "top5"]),
        ("loc", ["Loc", "ObjLoc", "Cls"]),
        ("svm", [f"mAP_res{i}" for i in (2, 3, 4, 5)] + [f"mAP11_res{i}" for i in (2, 3, 4, 5)]),
        ("views", [f"top1_res{i}" for i in (2, 3, 4, 5)]),
    ]
)
# What a table header says for a metric, where the key alone would mislead.
COLUMN_LABELS = {
    # loc's linear classification runs on cached, unaugmented res5 features with the loc
    # recipe: not MoCo's linear protocol behind InsLoc's Table 3a "Cls" (that is `linear`).
    "Cls": "Cls (cached)",
    **{f"mAP_res{i}": f"res{i} mAP" for i in (2, 3, 4, 5)},
    **{f"mAP11_res{i}": f"res{i} mAP11" for i in (2, 3, 4, 5)},
}
# A line under a protocol's table.
CAPTIONS = {
    "loc": "Cls (cached): linear classifier on cached res5 features with the loc recipe, not "
    "MoCo's augmented linear protocol of InsLoc's Table 3a (run `linear` for that).",
    "svm": "mAP: all-point VOC AP (DetCo's Table 12 number); mAP11: VOC07 11-point AP.",
}


def result_key(protocol: str, weights: str, train: str, val: str, layout: str) -> str:
    return f"{protocol} | {weights} | {layout} | {train} -> {val}"


def merge_results(output_dir: str, entries: Dict[str, Dict]):
    """Merge ``entries`` into ``<output_dir>/results.json`` and rewrite ``results.md``."""
    merge_results_files(output_dir, entries, markdown_tables)


def _fmt(v) -> str:
    return "" if v is None else f"{v:.1f}"


def markdown_tables(results: Dict[str, Dict]) -> str:
    """One table per protocol: weights, layout, data, the protocol's metrics, machine, date."""
    out = []
    for protocol, columns in METRIC_COLUMNS.items():
        rows = [r for r in results.values() if r["protocol"] == protocol]
        if not rows:
            continue
        cols = [c for c in columns if any(c in r["metrics"] for r in rows)]
        out.append(f"### {protocol}\n")
        head = " | ".join(COLUMN_LABELS.get(c, c) for c in cols)
        out.append(f"| weights | layout | train -> val | {head} | machine | date |")
        out.append("|---|---|---|" + "---|" * len(cols) + "---|---|")
        for r in rows:
            cells = [_fmt(r["metrics"].get(c)) for c in cols]
            out.append(
                f"| {os.path.basename(r['weights'])} | {r['layout']} | {r['train']} -> "
                f"{r['val']} | " + " | ".join(cells) + f" | {r['machine']} | {r['date']} |"
            )
        if protocol in CAPTIONS and any(COLUMN_LABELS.get(c, c) != c for c in cols):
            out.append(f"\n{CAPTIONS[protocol]}")
        out.append("")
    return "\n".join(out) + "\n"


# Column of the comparison table -> (protocol, metric, chance level of a result entry: 1 / the
# classes, the grid cells or the validation images). kNN: k = 20, else the smallest k run.
def _classes(r):
    return 100.0 / r["num_classes"]


def _cells(r):
    return 100.0 / r["settings"].get("grid", 3) ** 2


def _images(r):
    return 100.0 / r["num_val"]


COMPARISON = OrderedDict(
    [
        ("Views res4", ("views", "top1_res4", _images)),
        ("Views res5", ("views", "top1_res5", _images)),
        ("kNN", ("knn", "top1@k", _classes)),
        ("Cls (cached)", ("loc", "Cls", _classes)),
        ("linear", ("linear", "top1", _classes)),
        ("Loc", ("loc", "Loc", _cells)),
        ("ObjLoc", ("loc", "ObjLoc", _cells)),
    ]
)


def comparison_table(results: Dict[str, Dict]) -> str:
    """
    One row per weights file, one column per readout found in ``results`` (view retrieval
    top-1 on res4 / res5, kNN top-1 at k = 20, loc's Cls on cached features, linear top-1, Loc,
    ObjLoc), and a last row with the chance levels.
    """
    rows: "OrderedDict[str, Dict[str, float]]" = OrderedDict()
    chance, cols = {}, []
    for r in results.values():
        for col, (protocol, metric, level) in COMPARISON.items():
            if r["protocol"] != protocol:
                continue
            if metric == "top1@k":
                ks = sorted(int(k[len(metric) :]) for k in r["metrics"] if k.startswith(metric))
                metric = f"top1@k{20 if 20 in ks else ks[0]}" if ks else metric
            if metric in r["metrics"]:
                rows.setdefault(r["weights"], {})[col] = r["metrics"][metric]
                chance[col] = level(r)
                if col not in cols:
                    cols.append(col)
    cols = [c for c in COMPARISON if c in cols]
    lines = ["| weights | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for weights, m in rows.items():
        name = "random init" if weights == RANDOM_INIT else weights
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(c)) for c in cols) + " |")
    lines.append("| (chance) | " + " | ".join(_fmt(chance[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"
