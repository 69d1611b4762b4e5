"""DetCo (Xie et al. ICCV 2021): multi-level supervision + global-local contrast on a ResNet.

The authors did not release their pretraining code; this follows Sec. 3 and Fig. 2 of the paper.
Where the paper is silent (see also ``MODEL.DETCO`` in ``config.py``):

* The three terms of Eq. 1 are computed one way, as Eqs. 2, 4 and 5 define them: the query
  side (I_q or P_q) against the key side (I_k or P_k) and the queue of the key's kind. Nothing
  is symmetrised, like the MoCo v2 baseline, so a step costs one query and one key pass per
  input. L_{g<->l} (Eq. 4) is the local query against the global key and the global queue:
  named ``lg`` (l -> g) below.
* Every supervised stage has its own global and its own local queue (Fig. 2, "Queue_g/l").
* Global head of stage i: avgpool -> Linear(C_i, C_i) -> ReLU -> Linear(C_i, D); local head:
  the G*G pooled patch features concatenated (G*G*C_i) -> Linear(., C_i) -> ReLU -> Linear(., D).
  At res5 the global head is MoCo v2's (hidden 2048), as the paper says its heads are.
* The patch sets go through the same backbone as the global views (Sec. 3.3), as one
  (N*G*G, 3, P, P) batch, so their BN statistics are those of a batch of patches.
"""

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from torch import nn

from ...data.augmentation import PhotometricAugmentation
from ...data.jigsaw import cut_patches
from ..contrastive import ContrastiveQueue
from ..heads import GlobalEmbeddingHead, ProjectionMLP
from .base import ContrastivePretrainer, ContrastTerm, contrastive_args_from_config

__all__ = ["DetCo", "DetCoEncoder", "PatchSetEmbeddingHead"]

# The three InfoNCE terms of a stage: (name, query kind, key kind). The negatives come from the
# queue of the key's kind.
TERMS = (("gg", "g", "g"), ("ll", "l", "l"), ("lg", "l", "g"))


class PatchSetEmbeddingHead(nn.Module):
    """DetCo's local head mlp_local: pool each patch, concatenate a set, MLP, L2 normalise."""

    def __init__(
        self, in_channels: int, num_patches: int, hidden_dim: int, out_dim: int, norm: str = ""
    ):
        super().__init__()
        self.num_patches = num_patches
        self.mlp = ProjectionMLP(num_patches * in_channels, hidden_dim, out_dim, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (N * num_patches, C, H, W) features of N patch sets, each set contiguous.
        Returns:
            (N, out_dim) unit-norm embeddings.
        """
        pooled = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return F.normalize(self.mlp(pooled.reshape(-1, self.num_patches * pooled.shape[1])), dim=1)


class DetCoEncoder(nn.Module):
    """
    backbone + one global head per stage (+ one local head per stage): everything one side
    (query or key) of DetCo computes.
    """

    def __init__(
        self,
        backbone: Backbone,
        global_heads: nn.ModuleDict,
        local_heads: Optional[nn.ModuleDict] = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.global_heads = global_heads
        self.local_heads = local_heads

    def forward(
        self, images: torch.Tensor, patches: Optional[torch.Tensor] = None
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            images: (N, 3, H, W) normalised global views.
            patches: (N, G*G, 3, P, P) normalised patch sets, or None (no local embeddings).
        Returns:
            {"<stage>/g": (N, D)} for every stage with a global head, plus {"<stage>/l": (N, D)}
            for every stage with a local head when ``patches`` is given.
        """
        features = self.backbone(images)
        out = {f"{f}/g": head(features[f]) for f, head in self.global_heads.items()}
        if patches is not None and self.local_heads is not None:
            # All patches of the batch in one backbone call; a set stays contiguous.
            features = self.backbone(patches.flatten(0, 1))
            out.update({f"{f}/l": head(features[f]) for f, head in self.local_heads.items()})
        return out


@META_ARCH_REGISTRY.register()
class DetCo(ContrastivePretrainer):
    """
    Loss (DetCo Eq. 1): sum over stages i of w_i * (L^i_gg + L^i_ll + L^i_lg), each term an
    InfoNCE with its own queue per stage and kind. Inputs: dicts with ``view_q``, ``view_k``
    (3, S, S) and, for the global-local terms, ``patches_q``, ``patches_k`` (G*G, 3, P, P),
    all uint8 RGB (see ``JigsawMapper``).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        in_features: Sequence[str],
        stage_loss_weights: Sequence[float],
        term_weights: Sequence[float] = (1.0, 1.0, 1.0),
        global_local: bool = True,
        num_patches: int = 9,
        global_hidden_mult: int = 1,
        local_hidden_mult: int = 1,
        jigsaw_grid: int = 3,
        patch_size: int = 64,
        local_augmentation: Optional[PhotometricAugmentation] = None,
        mlp_norm: str = "",
        **kwargs,
    ):
        """
        Args:
            backbone: a detectron2 ResNet whose outputs include ``in_features``.
            in_features: supervised stages, e.g. ["res2", "res3", "res4", "res5"] (one for
                MoCo-style single-level supervision).
            stage_loss_weights: w_i, one per entry of ``in_features``.
            term_weights: weights of L_gg, L_ll, L_lg inside a stage.
            global_local: add the local heads, queues and the L_ll, L_lg terms (GLC).
            num_patches: G*G, patches per local view.
            global_hidden_mult, local_hidden_mult: hidden width of the global / local MLP as
                a multiple of the stage's channels C_i.
            jigsaw_grid, patch_size: G and P, to cut patch sets that arrive as uncut crops.
            local_augmentation: the photometric augmentation of the jigsaw crops on the
                device (the global views' family without RandAugment); None: done in the loader.
            mlp_norm: normalisation inside every MLP ("" or "BN", see ``ProjectionMLP``).
            kwargs: see :class:`ContrastivePretrainer`.
        """
        super().__init__(**kwargs)
        assert len(stage_loss_weights) == len(in_features), (stage_loss_weights, in_features)
        assert len(term_weights) == len(TERMS), term_weights
        self.in_features = list(in_features)
        self.stage_loss_weights = dict(zip(self.in_features, stage_loss_weights))
        self.term_weights = dict(zip([t[0] for t in TERMS], term_weights))
        self.global_local = global_local
        self.jigsaw_grid = jigsaw_grid
        self.patch_size = patch_size
        self.local_augmentation = local_augmentation
        channels = {f: backbone.output_shape()[f].channels for f in self.in_features}
        global_heads = nn.ModuleDict(
            {
                f: GlobalEmbeddingHead(c, global_hidden_mult * c, self.dim, mlp_norm)
                for f, c in channels.items()
            }
        )
        local_heads = None
        if global_local:
            local_heads = nn.ModuleDict(
                {
                    f: PatchSetEmbeddingHead(
                        c, num_patches, local_hidden_mult * c, self.dim, mlp_norm
                    )
                    for f, c in channels.items()
                }
            )
        self.encoder_q = DetCoEncoder(backbone, global_heads, local_heads)
        self.init_key_encoder()
        self.queues = self.build_queues(("g", "l") if global_local else ("g",))
        self.set_contrast_terms(
            self.build_terms(),
            [
                (f"{f}/{kind}", f"queues.{kind}.{f}")
                for kind in self.queues
                for f in self.in_features
            ],
        )

    def build_queues(self, kinds: Sequence[str]) -> nn.ModuleDict:
        """``queues[kind][stage]``: e.g. ``queues["g"]["res3"]`` holds the negatives of the
        global embeddings of res3 (Queue_g of Fig. 2)."""
        return nn.ModuleDict(
            {
                kind: nn.ModuleDict(
                    {f: ContrastiveQueue(self.dim, self.queue_size) for f in self.in_features}
                )
                for kind in kinds
            }
        )

    @classmethod
    def from_config(cls, cfg):
        d = cfg.MODEL.DETCO
        backbone = build_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
        in_features, weights = list(d.IN_FEATURES), list(d.STAGE_LOSS_WEIGHTS)
        missing = set(in_features) - set(backbone.output_shape())
        assert not missing, f"MODEL.RESNETS.OUT_FEATURES lacks DetCo stages {sorted(missing)}"
        if not d.MULTI_LEVEL:  # ablation "GLC only": MoCo's single, deepest level
            in_features, weights = in_features[-1:], weights[-1:]
        j = cfg.INPUT.PRETRAIN.JIGSAW
        args = contrastive_args_from_config(cfg)
        return {
            "backbone": backbone,
            "in_features": in_features,
            "stage_loss_weights": weights,
            "term_weights": list(d.TERM_WEIGHTS),
            "global_local": d.GLOBAL_LOCAL,
            "num_patches": j.GRID * j.GRID,
            "global_hidden_mult": d.GLOBAL_HIDDEN_MULT,
            "local_hidden_mult": d.LOCAL_HIDDEN_MULT,
            "jigsaw_grid": j.GRID,
            "patch_size": j.PATCH_SIZE,
            "mlp_norm": cfg.MODEL.CONTRAST.MLP_NORM,
            **args,
            "local_augmentation": PhotometricAugmentation(cfg) if args["augmentation"] else None,
        }

    def forward(self, batched_inputs: List[Dict]):
        """
        Training: ``{"loss_<stage>_<term>": w_i * w_term * InfoNCE}`` with term in gg, ll, lg.
        Inference: the query embeddings {"<stage>/g": (N, D), ...} of ``view_q`` (or ``image``).
        """
        if not self.training:
            key = "view_q" if "view_q" in batched_inputs[0] else "image"
            return self.encoder_q(self.preprocess(self.gather(batched_inputs, key)))
        q_inputs, k_inputs = self.prepare_inputs(batched_inputs)
        q = self.encoder_q(*q_inputs)
        with torch.no_grad():
            self.momentum_update()  # before the key forward, as in MoCo
            # Shuffle-BN permutes images and patch sets with one permutation of dim 0, so the
            # G*G patches of an image stay one set (and with their global view).
            k = self.encode_keys(*k_inputs)
        return self.contrastive_losses(q, k)

    def device_augmentations(self) -> List[PhotometricAugmentation]:
        local = [self.local_augmentation] if self.local_augmentation is not None else []
        return super().device_augmentations() + local

    def prepare_inputs(self, batched_inputs: List[Dict]):
        """
        Returns:
            query inputs and key inputs, each (images (N, 3, S, S),) or (images, patch sets
            (N, G*G, 3, P, P)), normalised, on the model's device.
        """
        q_inputs = [self.preprocess(self.gather(batched_inputs, "view_q"))]
        k_inputs = [self.preprocess(self.gather(batched_inputs, "view_k"))]
        if self.global_local:
            q_inputs.append(self.preprocess_patches(batched_inputs, "q"))
            k_inputs.append(self.preprocess_patches(batched_inputs, "k"))
        return q_inputs, k_inputs

    def preprocess_patches(self, batched_inputs: List[Dict], side: str) -> torch.Tensor:
        """
        Returns:
            (N, G*G, 3, P, P) normalised patch sets on the model's device: ``patches_<side>``
            cut in the loader, or ``jigsaw_<side>`` crops augmented here and cut with their
            ``cells_<side>`` / ``offsets_<side>``.
        """
        if f"patches_{side}" in batched_inputs[0]:
            return self.normalize(self.stack(self.gather(batched_inputs, f"patches_{side}")))
        crops, _ = self.preprocess_with_boxes(
            self.gather(batched_inputs, f"jigsaw_{side}"), None, self.local_augmentation
        )
        cells = self.stack(self.gather(batched_inputs, f"cells_{side}"))
        offsets = self.stack(self.gather(batched_inputs, f"offsets_{side}"))
        # The crops are already normalised: cutting is pure indexing.
        return cut_patches(crops, offsets, cells, self.jigsaw_grid, self.patch_size)

    def build_terms(self) -> List[ContrastTerm]:
        """
        The InfoNCE terms, stage by stage: ``loss_<stage>_<term>`` = w_i * w_term * InfoNCE
        (term in gg, ll, lg; each against the queue of its key's kind), its accuracy
        ``acc/<stage>_<term>``.
        """
        terms = []
        for f in self.in_features:
            for term, q_kind, k_kind in TERMS:
                if k_kind not in self.queues or q_kind not in self.queues:
                    continue  # ablation without the local branch: g<->g only
                weight = self.stage_loss_weights[f] * self.term_weights[term]
                name = f"{f}_{term}"
                terms.append(
                    ContrastTerm(
                        name,
                        f"loss_{name}",
                        f"{f}/{q_kind}",
                        f"{f}/{k_kind}",
                        f"queues.{k_kind}.{f}",
                        weight,
                    )
                )
        return terms
