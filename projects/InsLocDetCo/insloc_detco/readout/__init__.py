"""Readouts of frozen features: kNN, linear classification, InsLoc's linear localization,
DetCo's per-stage VOC07 SVMs, attention maps; the generated labelled set ``demo_cls``."""

from . import (
    datasets,  # noqa: F401  (registers imagenet_cls_{train,val})
    demo_cls,  # noqa: F401  (registers demo_cls_{train,val})
)
from .encoder import (
    LAYOUTS,
    RANDOM_INIT,
    STAGES,
    ReadoutEncoder,
    ReadoutError,
    build_readout_encoder,
    load_encoder_weights,
)
from .runner import PROTOCOLS, ReadoutSettings, run_readouts
