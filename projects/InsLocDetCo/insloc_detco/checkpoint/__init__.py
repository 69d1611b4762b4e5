from .checkpointer import SafeDetectionCheckpointer
from .safe_load import UnsafeWeightsError, load_weights_file
