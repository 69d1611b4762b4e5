"""The pretraining data loader: detectron2's train loader over unlabeled records."""

import itertools
import logging
from typing import Optional

from detectron2.data import DatasetCatalog, build_detection_train_loader
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm

from .batch import BatchCollator
from .datasets import ensure_registered
from .device_decode import decode_views
from .mapper import build_pretrain_mapper
from .sampler import ResumableTrainingSampler, SeededMapDataset

__all__ = ["get_pretrain_dataset_dicts", "build_pretrain_train_loader", "SkipCountingLoader"]

logger = logging.getLogger(__name__)


def get_pretrain_dataset_dicts(names):
    """Concatenate the records of the datasets ``names``, renumbering ``image_id``."""
    if isinstance(names, str):
        names = [names]
    assert len(names), "DATASETS.TRAIN is empty"
    dicts = []
    for name in names:
        ensure_registered(name)
        dicts.append(DatasetCatalog.get(name))
    return [dict(d, image_id=i) for i, d in enumerate(itertools.chain.from_iterable(dicts))]


class SkipCountingLoader:
    """
    Iterates a loader of record lists, removing each record's ``num_skipped`` and keeping the
    running total of images that were skipped as unreadable on this rank. With
    ``decode_device``, it also decodes and cuts the JPEGs that the loader left undecoded
    (``INPUT.PRETRAIN.DECODE_ON``) on that device, in the training process; files that fail
    to decode there are counted too.
    """

    def __init__(self, loader, decode_device: Optional[str] = None, sampler=None):
        self.loader = loader
        self.decode_device = decode_device
        self.sampler = sampler  # a ResumableTrainingSampler: where the stream starts
        self.num_skipped = 0

    def __iter__(self):
        for batch in self.loader:
            for d in getattr(batch, "extras", batch):  # a PretrainBatch's per-sample entries
                self.num_skipped += d.pop("num_skipped", 0)
            if self.decode_device is not None:
                self.num_skipped += decode_views(batch, self.decode_device)
            yield batch


def build_pretrain_train_loader(cfg):
    """
    Returns:
        SkipCountingLoader: an infinite iterable of per-rank batches of mapper dicts
        (:class:`PretrainBatch`: same-shaped tensors stacked in the loader workers, pinned for
        an asynchronous copy when training on CUDA; with device decoding, the views of the
        JPEGs the workers left undecoded already on ``MODEL.DEVICE``). If the mapper has a
        ``collate`` method (batch-level composition, e.g. InsLoc with in-batch backgrounds), it
        runs first, in the loader workers. Its ``sampler`` (:class:`ResumableTrainingSampler`,
        seeded by ``cfg.SEED`` when >= 0) sets the run's seed and the first iteration before
        iterating.
    """
    dataset_dicts = get_pretrain_dataset_dicts(cfg.DATASETS.TRAIN)
    mapper = build_pretrain_mapper(cfg, dataset_dicts)
    logger.info(
        f"Pretraining on {len(dataset_dicts)} images from {', '.join(cfg.DATASETS.TRAIN)}; "
        f"{cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()} per rank with "
        f"{type(mapper).__name__}; JPEGs decoded on "
        f"{cfg.MODEL.DEVICE if mapper.device_decoding else 'the loader workers'}."
    )
    kwargs = {"collate_fn": BatchCollator(getattr(mapper, "collate", None))}
    if cfg.MODEL.DEVICE.startswith("cuda") and cfg.DATALOADER.NUM_WORKERS > 0:
        kwargs["pin_memory"] = True
    records = DatasetFromList(dataset_dicts, copy=False, serialize=True)
    seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
    sampler = ResumableTrainingSampler(
        len(records), cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size(), seed
    )
    loader = build_detection_train_loader(
        dataset=SeededMapDataset(records, mapper),
        mapper=None,  # SeededMapDataset maps, seeded per sample
        sampler=sampler,
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        aspect_ratio_grouping=False,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        # The workers' base seed from a generator of the loader's own, not the process's (it is
        # drawn when iteration starts: at the first step of a run, resumed or not).
        seed=seed,
        **kwargs,
    )
    decode_device = cfg.MODEL.DEVICE if mapper.device_decoding else None
    return SkipCountingLoader(loader, decode_device, sampler)
