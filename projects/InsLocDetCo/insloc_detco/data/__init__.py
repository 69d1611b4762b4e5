from . import (
    copy_paste,  # noqa: F401  (registers CopyPasteMapper)
    datasets,  # noqa: F401  (registers the builtin unlabeled datasets)
    jigsaw,  # noqa: F401  (registers JigsawMapper)
)
from .build import build_pretrain_train_loader, get_pretrain_dataset_dicts
from .datasets import register_coco_images, register_image_folder, register_image_list
from .mapper import (
    PRETRAIN_MAPPER_REGISTRY,
    MoCoV2Mapper,
    PretrainDatasetMapper,
    UnreadableDatasetError,
    build_pretrain_mapper,
)
from .reading import ImageTooLargeError, UnreadableImageError, read_rgb_image
