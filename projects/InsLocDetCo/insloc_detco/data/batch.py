"""A per-rank pretraining batch that crosses the loader's process boundary as a few tensors.

detectron2's meta-architectures take a list of per-sample dicts. Sent as such from a loader
worker, every tensor of every sample is its own shared-memory segment: for DetCo at batch 64
that is 512 segments, each unpickled (file descriptor passing, ``mmap``) by the training process
in its one Python thread, and then copied again by ``torch.stack`` before the host-to-device
copy. :class:`PretrainBatch` stacks same-shaped tensors in the worker (in parallel, once), so the
training process receives one segment per key, can pin it (``pin_memory``) and copies it to the
device asynchronously. It still iterates and indexes as the list of per-sample dicts, so the
meta-architecture contract is unchanged.

With ``INPUT.PRETRAIN.DECODE_ON: device`` the batch also carries the JPEG files and crop boxes
that the training process decodes and cuts (:attr:`PretrainBatch.encoded`, see
:mod:`.device_decode`); their views join :attr:`PretrainBatch.tensors` there.
"""

from typing import Dict, Iterator, List, Optional

import torch

from .device_decode import EncodedImages, pack_encoded

__all__ = ["PretrainBatch", "BatchCollator"]


class PretrainBatch:
    """
    Attributes:
        tensors: key -> (N, ...) tensor, for every key whose values are tensors of one shape and
            dtype in all N samples.
        extras: per-sample dicts of everything else (e.g. ``image_id``, ``num_skipped``).
        encoded: the files left for the training device to decode and their crops, or None
            (:func:`~.device_decode.decode_views` replaces them with views in ``tensors``).
    """

    def __init__(self, samples: List[Dict], encoded: Optional[EncodedImages] = None):
        first = samples[0]
        keys = [
            k
            for k, v in first.items()
            if torch.is_tensor(v)
            and all(
                torch.is_tensor(s.get(k)) and s[k].shape == v.shape and s[k].dtype == v.dtype
                for s in samples
            )
        ]
        self.tensors: Dict[str, torch.Tensor] = {
            k: torch.stack([s.pop(k) for s in samples]) for k in keys
        }
        self.extras: List[Dict] = samples
        self.encoded = encoded
        self._views_added = False

    def __len__(self) -> int:
        return len(self.extras)

    def _samples(self) -> List[Dict]:
        """The per-sample dicts, with views into :attr:`tensors` (made once, on first use)."""
        if not self._views_added:
            for i, sample in enumerate(self.extras):
                sample.update({k: t[i] for k, t in self.tensors.items()})
            self._views_added = True
        return self.extras

    def __iter__(self) -> Iterator[Dict]:
        return iter(self._samples())

    def __getitem__(self, index):
        return self._samples()[index]

    def stacked(self, key: str) -> Optional[torch.Tensor]:
        """(N, ...) tensor of ``key``, or None if it was not stacked."""
        return self.tensors.get(key)

    def refresh_views(self):
        """Make the per-sample dicts' views anew after :attr:`tensors` changed."""
        if self._views_added:
            self._views_added = False
            self._samples()

    def pin_memory(self) -> "PretrainBatch":
        """Called by the DataLoader's pinning thread (``pin_memory=True``)."""
        self.tensors = {k: t.pin_memory() for k, t in self.tensors.items()}
        if self.encoded is not None:
            self.encoded = self.encoded.pin_memory()
        self.refresh_views()
        return self

    def __getstate__(self):
        # Ship the stacked tensors once, not the per-sample views of them.
        extras = [{k: v for k, v in s.items() if k not in self.tensors} for s in self.extras]
        return {
            "tensors": self.tensors,
            "extras": extras,
            "encoded": self.encoded,
            "_views_added": False,
        }


class BatchCollator:
    """The loader's ``collate_fn``: the mapper's own ``collate`` if it has one, then
    :class:`PretrainBatch` (with the files the training device decodes packed apart)."""

    def __init__(self, mapper_collate=None):
        self.mapper_collate = mapper_collate

    def __call__(self, samples: List[Dict]) -> PretrainBatch:
        if self.mapper_collate is not None:
            samples = self.mapper_collate(samples)
        encoded = pack_encoded(samples)
        return PretrainBatch(samples, encoded)
