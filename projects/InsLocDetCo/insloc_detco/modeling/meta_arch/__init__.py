from .base import ContrastivePretrainer
from .moco import MoCoV2
from .detco import DetCo
