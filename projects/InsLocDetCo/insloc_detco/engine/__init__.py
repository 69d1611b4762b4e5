from .hooks import PlotCurvesHook, SkippedImagesHook, plot_metrics, read_metrics
from .launch import (
    LaunchError,
    dist_timeout,
    exit_process,
    is_launch_leader,
    launch,
    run_entry_point,
)
from .log_setup import log_exceptions, setup_logging
from .lr_scaling import merge_opts_scaling_lr
from .summary import describe_model, describe_schedule
from .trainer import (
    DeviceAgnosticTrainer,
    PretrainTrainer,
    create_ddp_model_any_device,
    resolve_config_file,
    resolve_device,
    resolve_epochs,
)
