"""What every contrastive pretraining meta-architecture shares."""

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from detectron2.utils.events import get_event_storage
from torch import nn

from ...data.augmentation import PhotometricAugmentation, photometric_on_device
from ..contrastive import (
    ContrastiveQueue,
    concat_all_gather,
    contrastive_accuracy,
    encode_with_shuffle_bn,
    info_nce,
    momentum_update,
)

__all__ = [
    "ContrastivePretrainer",
    "ContrastTerm",
    "contrastive_args_from_config",
    "channels_last_from_config",
]

# A batch of same-shaped tensors: stacked (N, ...) or a list of N.
ImageBatch = Union[torch.Tensor, List[torch.Tensor]]


@dataclass(frozen=True)
class ContrastTerm:
    """
    One InfoNCE term of a method's loss: query embedding ``query`` against the positive key
    embedding ``key`` and the negatives of the queue ``queue`` (a ``ContrastiveQueue``'s
    module name), times ``weight``; ``loss`` names it in the loss dict, ``metric`` its
    accuracy.
    """

    metric: str
    loss: str
    query: str
    key: str
    queue: str
    weight: float = 1.0


def channels_last_from_config(cfg) -> bool:
    """``MODEL.CHANNELS_LAST`` applies to CUDA models only."""
    return bool(cfg.MODEL.CHANNELS_LAST) and cfg.MODEL.DEVICE.startswith("cuda")


def contrastive_args_from_config(cfg, randaugment: bool = True) -> Dict:
    """
    Args:
        randaugment: whether the views' photometric augmentation includes RandAugment when
            ``INPUT.PRETRAIN.RANDAUGMENT_OPS`` > 0 (DetCo "AA" global views; not InsLoc).
    """
    c = cfg.MODEL.CONTRAST
    on_device = photometric_on_device(cfg)
    return {
        "dim": c.DIM,
        "queue_size": c.QUEUE_SIZE,
        "temperature": c.TEMPERATURE,
        "momentum": c.MOMENTUM,
        "shuffle_bn": c.SHUFFLE_BN,
        "single_process_bn_splits": c.SINGLE_PROCESS_BN_SPLITS,
        "pixel_mean": cfg.MODEL.PIXEL_MEAN,
        "pixel_std": cfg.MODEL.PIXEL_STD,
        "augmentation": (
            PhotometricAugmentation(cfg, randaugment=randaugment) if on_device else None
        ),
        "channels_last": channels_last_from_config(cfg),
        "metrics_period": cfg.SOLVER.LOG_PERIOD,
    }


class ContrastivePretrainer(nn.Module):
    """
    Base of the query/key (momentum) encoder models. A subclass builds ``self.encoder_q``,
    calls :meth:`init_key_encoder` and :meth:`set_contrast_terms`, and implements ``forward``;
    the pieces of a MoCo step are here: normalise the views, update the key encoder, encode
    keys with shuffle-BN, compute and log the InfoNCE terms, enqueue the keys.
    """

    def __init__(
        self,
        *,
        dim: int,
        queue_size: int,
        temperature: float,
        momentum: float,
        shuffle_bn: bool,
        single_process_bn_splits: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        augmentation: Optional[PhotometricAugmentation] = None,
        channels_last: bool = False,
        metrics_period: int = 1,
    ):
        """
        Args:
            dim: embedding dimension.
            queue_size: K, keys per queue.
            temperature: T of InfoNCE.
            momentum: m of the key encoder EMA.
            shuffle_bn: encode keys with shuffle-BN (see ``encode_with_shuffle_bn``).
            single_process_bn_splits: chunks of the split-batch emulation on one process.
            pixel_mean, pixel_std: per-channel normalisation of the RGB 0-255 input.
            augmentation: the views' photometric augmentation, applied to each training batch
                on the model's device in :meth:`preprocess` (None: the loader applied it).
            channels_last: give the encoders NHWC batches (the model itself is converted by
                the trainer).
            metrics_period: record the contrastive accuracies every this many iterations
                (reading one back from the GPU stalls the step: do it when they are logged).
        """
        super().__init__()
        self.dim = dim
        self.queue_size = queue_size
        self.temperature = temperature
        self.momentum = momentum
        self.shuffle_bn = shuffle_bn
        self.single_process_bn_splits = single_process_bn_splits
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.augmentation = augmentation
        self.channels_last = channels_last
        self.metrics_period = max(1, metrics_period)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def init_key_encoder(self):
        """Make ``encoder_k`` a frozen copy of ``encoder_q`` (MoCo: identical at start)."""
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)

    @staticmethod
    def gather(batched_inputs, key: str):
        """The ``key`` entries of a batch: the (N, ...) tensor a ``PretrainBatch`` stacked in
        the loader, else the list of the per-sample tensors."""
        stacked = getattr(batched_inputs, "stacked", None)
        tensor = stacked(key) if stacked is not None else None
        return tensor if tensor is not None else [x[key] for x in batched_inputs]

    def preprocess(self, images: ImageBatch) -> torch.Tensor:
        """
        Args:
            images: (N, 3, H, W) uint8 RGB views, or a list of N (3, H, W) ones.
        Returns:
            (N, 3, H, W) float tensor on the model's device, photometrically augmented there in
            training if ``augmentation`` is set, normalised by mean/std.
        """
        return self.preprocess_with_boxes(images, None)[0]

    def preprocess_with_boxes(
        self,
        images: ImageBatch,
        boxes: Optional[torch.Tensor],
        augmentation: Optional[PhotometricAugmentation] = None,
        boxes_if_flipped: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """
        :meth:`preprocess` for views with XYXY boxes (``boxes`` (N, 4) or (N, K, 4) on the
        model's device, or None), flipped with their view; ``boxes_if_flipped`` replaces them
        for the views that get flipped (see ``PhotometricAugmentation.apply``). ``augmentation``
        replaces the model's own (e.g. DetCo's local crops).
        """
        x = self.stack(images)
        augmentation = augmentation or self.augmentation
        if self.training and augmentation is not None:
            x, boxes = augmentation(x, boxes, boxes_if_flipped)
        return self.normalize(x), boxes

    def stack(self, tensors: ImageBatch) -> torch.Tensor:
        """Same-shaped tensors (or a stacked one) as a batch on the model's device; the copy is
        asynchronous from pinned memory."""
        batch = tensors if torch.is_tensor(tensors) else torch.stack(tensors)
        return batch.to(self.device, non_blocking=True)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) RGB 0-255 on the device -> normalised float (NHWC if configured)."""
        x = (x.float() - self.pixel_mean) / self.pixel_std
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def device_augmentations(self) -> List[PhotometricAugmentation]:
        """The photometric augmentations this model runs on its device (none: the loader)."""
        return [self.augmentation] if self.augmentation is not None else []

    def compile_step(self, **compile_kwargs):
        """
        The fast path: ``torch.compile(**compile_kwargs)`` of what a step runs most, the query
        and key encoders (forward and backward), all InfoNCE terms (:meth:`info_nce_terms`,
        forward and backward), the queue writes (:meth:`write_queues`) and the fixed-shape part
        of the on-device augmentation (``PhotometricAugmentation.transform``). In place:
        parameter names, checkpoints and the step's definition are unchanged; the random draws
        and the collectives stay eager.
        """
        self.encoder_q.compile(**compile_kwargs)
        self.encoder_k.compile(**compile_kwargs)
        self.info_nce_terms = torch.compile(self.info_nce_terms, **compile_kwargs)
        self.write_queues = torch.compile(self.write_queues, **compile_kwargs)
        for augmentation in self.device_augmentations():
            augmentation.transform = torch.compile(augmentation.transform, **compile_kwargs)

    @torch.no_grad()
    def momentum_update(self):
        momentum_update(self.encoder_q, self.encoder_k, self.momentum)

    @torch.no_grad()
    def encode_keys(self, *inputs: torch.Tensor):
        """Run ``encoder_k`` on ``inputs`` (all (N, ...)) with shuffle-BN if enabled."""
        if not self.shuffle_bn:
            return self.encoder_k(*inputs)
        return encode_with_shuffle_bn(
            self.encoder_k, *inputs, single_process_splits=self.single_process_bn_splits
        )

    def set_contrast_terms(
        self, terms: Sequence[ContrastTerm], enqueued: Sequence[Tuple[str, str]]
    ):
        """
        Declare the method's loss (called once by the subclass, after its queues exist).

        Args:
            terms: the InfoNCE terms, in the order of the loss dict.
            enqueued: (key embedding, queue) pairs: after the losses, the key embedding is
                written to the queue (``ContrastiveQueue`` module name, e.g. ``queues.p2``).
        """
        self.contrast_terms = list(terms)
        self.enqueued = list(enqueued)
        modules = dict(self.named_modules())
        for queue in [t.queue for t in self.contrast_terms] + [q for _, q in self.enqueued]:
            assert isinstance(modules.get(queue), ContrastiveQueue), f"no queue {queue!r}"
        # The queues holding negatives, each once, in the order of the negatives' snapshot.
        self.negative_queues = list(dict.fromkeys(t.queue for t in self.contrast_terms))

    def contrastive_losses(
        self, q: Dict[str, torch.Tensor], k: Dict[str, torch.Tensor]
    ) -> Dict[str, torch.Tensor]:
        """
        The method's InfoNCE terms (:meth:`set_contrast_terms`), then the keys' enqueue.

        Each term's top-1 accuracy goes to the event storage as ``[metric]acc/<metric>`` every
        ``metrics_period`` iterations (one read-back for all terms, printed next to the
        losses).

        Args:
            q, k: query and key embeddings {name: (N, D)}, unit-norm.
        Returns:
            {loss name: weighted scalar loss}.
        """
        # A snapshot of the negatives: the enqueue below must not change what autograd saved.
        negatives = torch.cat([self.get_submodule(name).keys for name in self.negative_queues])
        losses, accuracies = self.info_nce_terms(q, k, negatives)
        if self.training:
            storage = get_event_storage()
            if storage.iter % self.metrics_period == 0:
                for term, accuracy in zip(self.contrast_terms, accuracies.tolist()):
                    storage.put_scalar(f"[metric]acc/{term.metric}", accuracy)
        self.enqueue_keys(k)
        return dict(zip([t.loss for t in self.contrast_terms], losses.unbind()))

    def info_nce_terms(
        self, q: Dict[str, torch.Tensor], k: Dict[str, torch.Tensor], negatives: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            q, k: as for :meth:`contrastive_losses`.
            negatives: the keys of ``negative_queues``, concatenated.
        Returns:
            (T,) weighted losses and (T,) top-1 accuracies (%) of the T terms. Fixed shapes,
            no host sync: the fast path compiles it into one graph (forward and backward).
        """
        sizes = [self.get_submodule(name).size for name in self.negative_queues]
        by_queue = dict(zip(self.negative_queues, negatives.split(sizes)))
        losses, accuracies = [], []
        for term in self.contrast_terms:
            loss, logits = info_nce(
                q[term.query], k[term.key], by_queue[term.queue], self.temperature
            )
            losses.append(term.weight * loss)
            accuracies.append(contrastive_accuracy(logits))
        return torch.stack(losses), torch.stack(accuracies)

    @torch.no_grad()
    def enqueue_keys(self, k: Dict[str, torch.Tensor]):
        """Write the key embeddings to their queues (``enqueued``): all gathered from the ranks
        at once, then written by :meth:`write_queues`."""
        keys = torch.stack([k[name] for name, _ in self.enqueued], dim=1)  # (N, Q, D)
        self.write_queues(concat_all_gather(keys).transpose(0, 1))

    @torch.no_grad()
    def write_queues(self, keys: torch.Tensor):
        """
        Args:
            keys: (Q, M, D): the M keys of all ranks for each queue of ``enqueued``. Device
                ops only: the fast path compiles it into one graph.
        """
        for (_, name), new in zip(self.enqueued, keys.unbind(0)):
            self.get_submodule(name).write(new)
