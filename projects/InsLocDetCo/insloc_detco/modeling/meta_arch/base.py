"""What every contrastive pretraining meta-architecture shares."""
import copy
from typing import Dict, List, Sequence

import torch
from detectron2.utils.events import get_event_storage
from torch import nn

from ..contrastive import contrastive_accuracy, encode_with_shuffle_bn, info_nce, momentum_update

__all__ = ["ContrastivePretrainer", "contrastive_args_from_config"]


def contrastive_args_from_config(cfg) -> Dict:
    c = cfg.MODEL.CONTRAST
    return {
        "dim": c.DIM,
        "queue_size": c.QUEUE_SIZE,
        "temperature": c.TEMPERATURE,
        "momentum": c.MOMENTUM,
        "shuffle_bn": c.SHUFFLE_BN,
        "single_process_bn_splits": c.SINGLE_PROCESS_BN_SPLITS,
        "pixel_mean": cfg.MODEL.PIXEL_MEAN,
        "pixel_std": cfg.MODEL.PIXEL_STD,
    }


class ContrastivePretrainer(nn.Module):
    """
    Base of the query/key (momentum) encoder models. A subclass builds ``self.encoder_q``,
    calls :meth:`init_key_encoder`, and implements ``forward``; the pieces of a MoCo step are
    here: normalise the views, update the key encoder, encode keys with shuffle-BN, and
    compute/log one InfoNCE term.
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

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def init_key_encoder(self):
        """Make ``encoder_k`` a frozen copy of ``encoder_q`` (MoCo: identical at start)."""
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)

    def preprocess(self, images: List[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            images: list of (3, H, W) uint8 RGB tensors of one size.
        Returns:
            (N, 3, H, W) float tensor on the model's device, normalised by mean/std.
        """
        x = torch.stack(images).to(self.device, non_blocking=True).float()
        return (x - self.pixel_mean) / self.pixel_std

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

    def contrast(
        self, name: str, q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor
    ) -> torch.Tensor:
        """
        One InfoNCE term; its top-1 accuracy goes to the event storage as ``[metric]acc/<name>``
        (printed on the console next to the losses).

        Args:
            q, k: (N, D) unit-norm queries and positive keys; negatives: (K, D).
        Returns:
            scalar loss.
        """
        loss, logits = info_nce(q, k, negatives, self.temperature)
        if self.training:
            get_event_storage().put_scalar(f"[metric]acc/{name}", contrastive_accuracy(logits))
        return loss
