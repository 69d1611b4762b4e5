"""
InsLoc's linear localization readout (Yang et al., CVPR 2021, Sec. 5.2, Table 3a, Fig. 4):
split each image into an M = g x g grid; for every cell, run the whole image through the frozen
backbone, RoI-pool the cell's box and pass it through the detector's head (C4: res5; FPN:
4conv1fc); a linear classifier then predicts the cell index from that vector ("Loc"). The
paper pairs it with the linear classification accuracy of the same backbone ("Cls"), which
shows the trade-off: R50-C4, MoCo v2 Cls 67.7 / Loc 71.9, InsLoc 61.7 / 74.2.

Chance is 1 / M. A feature scores high when it says *where* in the image a region is, which
a detector needs and a classifier does not. On small images this saturates for any CNN, random
init included: every cell's receptive field reaches the zero-padded image border, which tells
the position (96 px images: 100 % for random init).

On data sets with one object box per image (``demo_cls``) a second readout asks where the
*object* is ("ObjLoc"): the same per-cell features, one linear scoring function shared by the
cells, a softmax over the M cells of each image, trained to pick the cell holding the object's
centre. A feature scores high when a region's vector says whether it holds the object.
"""

from typing import Dict, List

import torch

from .linear import LinearRecipe, linear_probe

__all__ = [
    "grid_boxes",
    "cell_labels",
    "CellLabels",
    "object_cells",
    "localization_probe",
    "object_cell_probe",
]


def grid_boxes(height: int, width: int, grid: int = 3) -> torch.Tensor:
    """
    Returns:
        (grid * grid, 4) XYXY boxes of the cells, row-major (cell index = row * grid + col).
    """
    ys = torch.linspace(0, height, grid + 1)
    xs = torch.linspace(0, width, grid + 1)
    return torch.tensor(
        [[xs[c], ys[r], xs[c + 1], ys[r + 1]] for r in range(grid) for c in range(grid)]
    )


def cell_labels(num_images: int, cells: int) -> torch.Tensor:
    """(num_images * cells,) cell index of each row of the "boxes" features (image-major)."""
    return torch.arange(cells).repeat(num_images)


class CellLabels:
    """:func:`cell_labels` computed for the rows asked for (nothing stored per row)."""

    def __init__(self, cells: int):
        self.cells = cells

    def __getitem__(self, rows) -> torch.Tensor:
        return torch.as_tensor(rows, dtype=torch.long) % self.cells


def localization_probe(
    train_boxes,
    val_boxes,
    cells: int,
    recipe: LinearRecipe,
    distributed: bool = False,
    device="cpu",
) -> Dict[str, float]:
    """
    Args:
        train_boxes, val_boxes: (N * cells, D) per-cell features, image-major (tensors or
            memory-mapped arrays; ``distributed``: this process's shards).
        cells: M.
    Returns:
        {"Loc": top-1 accuracy (%) of the cell index on the validation cells}.
    """
    labels = CellLabels(cells)
    acc = linear_probe(train_boxes, labels, val_boxes, labels, cells, recipe, distributed, device)
    return {"Loc": acc["top1"]}


def object_cells(records: List[Dict], resize: int, crop: int, grid: int = 3) -> torch.Tensor:
    """
    The cell holding each record's object centre, in the image after ``eval_transform(resize,
    crop)`` (shorter side resized to ``resize``, centred ``crop`` x ``crop``).

    Args:
        records: with ``bbox`` (XYXY pixels), ``width`` and ``height``.
    Returns:
        (N,) int64 cell indices (row-major); a centre outside the crop is clamped to the edge.
    """
    out = []
    for r in records:
        x0, y0, x1, y1 = r["bbox"]
        scale = resize / min(r["width"], r["height"])
        ox, oy = (r["width"] * scale - crop) / 2, (r["height"] * scale - crop) / 2
        cx, cy = (x0 + x1) / 2 * scale - ox, (y0 + y1) / 2 * scale - oy
        col = min(grid - 1, max(0, int(cx * grid // crop)))
        row = min(grid - 1, max(0, int(cy * grid // crop)))
        out.append(row * grid + col)
    return torch.tensor(out, dtype=torch.long)


def object_cell_probe(
    train_boxes,
    train_cells: torch.Tensor,
    val_boxes,
    val_cells: torch.Tensor,
    cells: int,
    recipe: LinearRecipe,
    distributed: bool = False,
    device="cpu",
) -> Dict[str, float]:
    """
    Args:
        train_boxes, val_boxes: (N * cells, D) per-cell features, image-major (tensors or
            memory-mapped arrays; ``distributed``: this process's shards).
        train_cells, val_cells: (N,) the cell of each image's object (:func:`object_cells`).
    Returns:
        {"ObjLoc": top-1 accuracy (%) of the object's cell on the validation images}.
    """
    d = train_boxes.shape[1]
    acc = linear_probe(
        train_boxes.reshape(-1, cells, d),
        train_cells,
        val_boxes.reshape(-1, cells, d),
        val_cells,
        1,
        recipe,
        distributed,
        device,
    )
    return {"ObjLoc": acc["top1"]}
