"""
Seeded random subsets of a labelled data set: Mini-COCO (InsLoc Sec. 5.3, 10% of train2017)
and the semi-supervised COCO sets (DetCo Table 8 and its appendix, 1/2/5/10% of train2017).

The papers publish no image lists, so the split is defined here (choice): sort the image ids,
permute them with ``numpy.random.default_rng(seed)``, keep the first ``round(fraction * N)``.
The subset is the same on every machine and process, and for one seed the smaller subsets are
contained in the larger ones (1% in 2% in 5% in 10%), so the sizes compare data amounts only.
The split seed is fixed per data set name; the fine-tuning seed varies between trials.

Registered names: ``coco_2017_train_{1,2,5,10}pct`` (split seed 1), ``demo_det_coco_train_50pct``,
and any ``<registered name>_<P>pct[_seed<S>]`` on first use (``data.datasets.try_register``).
"""

import logging
from typing import List, Optional, Sequence

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog

from ..data.datasets import register_on_first_use, try_register

__all__ = ["DEFAULT_SPLIT_SEED", "subset_image_ids", "register_subset"]

logger = logging.getLogger(__name__)

DEFAULT_SPLIT_SEED = 1


def subset_image_ids(image_ids: Sequence, fraction: float, seed: int) -> List:
    """
    Args:
        image_ids: ids of all images (any order, unique, sortable).
        fraction: in (0, 1].
        seed: split seed.
    Returns:
        the sorted ids of the subset, ``max(1, round(fraction * N))`` of them.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"Subset fraction must be in (0, 1], got {fraction}.")
    ids = sorted(image_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("Image ids are not unique: a subset by id would be ambiguous.")
    order = np.random.default_rng(seed).permutation(len(ids))
    keep = order[: max(1, int(round(fraction * len(ids))))]
    return sorted(ids[i] for i in keep)


def register_subset(name: str, base: str, fraction: float, seed: int = DEFAULT_SPLIT_SEED):
    """
    Register ``name`` as the seeded ``fraction`` of the images of registered data set ``base``.
    Metadata (classes, evaluator type) is inherited; ``json_file`` is not, since it describes
    the whole set (an evaluator on the subset converts the subset itself).
    """

    def load():
        dicts = DatasetCatalog.get(base)
        keep = set(subset_image_ids([d["image_id"] for d in dicts], fraction, seed))
        subset = [d for d in dicts if d["image_id"] in keep]
        logger.info(
            f"Dataset '{name}': {len(subset)} of {len(dicts)} images of '{base}' "
            f"({fraction:.0%}, split seed {seed})."
        )
        return subset

    DatasetCatalog.register(name, load)
    meta = {
        k: v
        for k, v in MetadataCatalog.get(base).as_dict().items()
        if k not in ("name", "json_file")
    }
    MetadataCatalog.get(name).set(
        **meta, subset_of=base, subset_fraction=fraction, subset_seed=seed
    )


def _register_named_subset(name: str, base: str, pct: str, seed: Optional[str]) -> bool:
    """``<base>_<P>pct[_seed<S>]``, if ``base`` is (or can be) registered."""
    if not try_register(base):
        return False
    register_subset(name, base, float(pct) / 100, int(seed) if seed else DEFAULT_SPLIT_SEED)
    return True


register_on_first_use(
    "<name>_<P>pct[_seed<S>]",
    r"(?P<base>.+)_(?P<pct>\d+(?:\.\d+)?)pct(?:_seed(?P<seed>\d+))?",
    _register_named_subset,
)


def _register_builtin():
    for pct in (1, 2, 5, 10):
        try_register(f"coco_2017_train_{pct}pct")
    try_register("demo_det_coco_train_50pct")  # the instant semi-supervised test


_register_builtin()
