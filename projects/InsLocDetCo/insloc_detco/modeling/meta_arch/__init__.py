from .base import ContrastivePretrainer
from .moco import MoCoV2
