from .checkpointer import SafeDetectionCheckpointer
from .integrity import CorruptCheckpointError, DiskFullError, save_checkpoint_file, verify_checksum
from .periodic import PeriodicCheckpointer, describe_checkpoint_disk_use, estimate_checkpoint_bytes
from .safe_load import UnsafeWeightsError, load_weights_file
