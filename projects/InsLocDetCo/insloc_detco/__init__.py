"""InsLocDetCo: detection-oriented self-supervised pretraining on detectron2."""
from . import (
    data,  # noqa: F401  (registers datasets and mappers)
    modeling,  # noqa: F401  (registers meta-architectures)
    readout,  # noqa: F401  (registers the labelled readout data sets)
    transfer,  # noqa: F401  (registers fine-tuning heads and the demo_det data sets)
)
from .config import add_insloc_detco_config

__all__ = ["add_insloc_detco_config"]
