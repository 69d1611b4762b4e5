"""InsLocDetCo: detection-oriented self-supervised pretraining on detectron2."""

from .warning_filters import ignore_known_third_party_warnings

ignore_known_third_party_warnings()  # before the imports below load detectron2 and fvcore

from . import (  # noqa: E402
    data,  # noqa: F401  (registers datasets and mappers)
    modeling,  # noqa: F401  (registers meta-architectures)
    readout,  # noqa: F401  (registers the labelled readout data sets)
    transfer,  # noqa: F401  (registers fine-tuning heads and the demo_det data sets)
)
from .config import add_insloc_detco_config  # noqa: E402

__all__ = ["add_insloc_detco_config"]
