from .base import ContrastivePretrainer
from .detco import DetCo
from .insloc import InstanceLocalization
from .insloc_c4 import InsLocC4
from .insloc_fpn import InsLocFPN
from .moco import MoCoV2
