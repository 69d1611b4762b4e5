from .hooks import PlotCurvesHook, SkippedImagesHook, plot_metrics
from .trainer import (
    DeviceAgnosticTrainer,
    PretrainTrainer,
    create_ddp_model_any_device,
    resolve_config_file,
    resolve_device,
    resolve_epochs,
)
