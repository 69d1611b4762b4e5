"""Transfer to detection: weight converter, fine-tuning recipes, benchmarks, demo data."""

from . import (
    demo_cityscapes,  # noqa: F401  (registers demo_cityscapes_fine_instance_seg_{train,val})
    demo_det,  # noqa: F401  (registers demo_det_{voc,coco,keypoints}_{train,val})
    roi_heads,  # noqa: F401  (registers ExtraNormRes5ROIHeads, ExtraNormConvFCHead)
    subsets,  # noqa: F401  (registers the seeded COCO subsets)
)
from .config import load_transfer_config
from .converter import ConversionError, convert_checkpoint, convert_state_dict, save_model_zoo_pkl
