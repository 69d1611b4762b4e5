from .hooks import PlotCurvesHook, SkippedImagesHook, plot_metrics
from .trainer import PretrainTrainer, resolve_config_file, resolve_device, resolve_epochs
