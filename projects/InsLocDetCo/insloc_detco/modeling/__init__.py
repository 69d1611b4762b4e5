from . import meta_arch  # noqa: F401  (registers the meta-architectures)
from .contrastive import (
    ContrastiveQueue,
    concat_all_gather,
    encode_with_shuffle_bn,
    info_nce,
    momentum_update,
)
from .heads import GlobalEmbeddingHead, ProjectionMLP
