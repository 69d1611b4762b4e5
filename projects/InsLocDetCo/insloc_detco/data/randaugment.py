"""RandAugment (Cubuk et al. 2020) for a batch, with ops drawn per sample (DetCo's "AA" views).

torchvision's ``transforms.v2.RandAugment`` draws one op sequence per call, i.e. per image. On a
batch, samples that drew the same op and sign are grouped and the op runs once on the group,
through the very op table and kernels of torchvision's ``RandAugment`` (so magnitudes, fill and
interpolation are torchvision's; torchvision's functional kernels accept batches). The result
is what the per-image transform gives for the same draws (``tests/test_photometric.py``).
"""

from typing import Dict, Optional

import torch
from torchvision.transforms import v2

__all__ = ["BatchRandAugment"]


class BatchRandAugment:
    """
    ``num_ops`` ops per sample, uniformly from torchvision's RandAugment table, at magnitude
    bin ``magnitude`` of ``num_magnitude_bins``, signed ops negated with probability 1/2.
    """

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31):
        # torchvision's transform holds the op table, the magnitude rule and the op kernels
        # (private API, pinned by tests/test_photometric.py).
        self._tv = v2.RandAugment(
            num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=num_magnitude_bins
        )
        self.ops = list(self._tv._AUGMENTATION_SPACE)
        self.num_ops = num_ops
        self.magnitude = magnitude

    def __repr__(self):
        return f"BatchRandAugment(num_ops={self.num_ops}, magnitude={self.magnitude})"

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Dict:
        """
        Returns:
            "op": (n, num_ops) indices into :attr:`ops`; "negate": (n, num_ops) bool.
        """
        return {
            "op": torch.randint(len(self.ops), (n, self.num_ops), generator=generator),
            "negate": torch.rand((n, self.num_ops), generator=generator) < 0.5,
        }

    def signed_magnitude(self, op: str, negate: bool, height: int, width: int) -> float:
        magnitudes_fn, signed = self._tv._AUGMENTATION_SPACE[op]
        magnitudes = magnitudes_fn(self._tv.num_magnitude_bins, height, width)
        if magnitudes is None:
            return 0.0
        magnitude = float(magnitudes[self.magnitude])
        return -magnitude if (signed and negate) else magnitude

    def apply(self, images: torch.Tensor, params: Dict) -> torch.Tensor:
        """
        Args:
            images: (N, 3, H, W) uint8 (RandAugment's ops are defined on 8-bit images).
            params: from :meth:`sample`.
        Returns:
            (N, 3, H, W) uint8.
        """
        assert images.dtype == torch.uint8, images.dtype
        x = images.clone()
        h, w = x.shape[-2:]
        for position in range(self.num_ops):
            ops, negate = params["op"][:, position], params["negate"][:, position]
            for op_index, op in enumerate(self.ops):
                for sign in (False, True):
                    idx = ((ops == op_index) & (negate == sign)).nonzero().squeeze(1)
                    if idx.numel() == 0:
                        continue
                    idx = idx.to(x.device, non_blocking=True)
                    out = self._tv._apply_image_or_video_transform(
                        x[idx],
                        op,
                        self.signed_magnitude(op, sign, h, w),
                        interpolation=self._tv.interpolation,
                        fill=self._tv._fill,
                    )
                    x.index_copy_(0, idx, out)
        return x
