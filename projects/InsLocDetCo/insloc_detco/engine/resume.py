"""What a resumed run needs to continue as if it had never stopped, and to be the same run.

:class:`RunStateHook` keeps, in every checkpoint (as trainer state), the run's seed and its
fully resolved config:

* **Same random numbers.** Before each step every process seeds its generators from
  ``(seed, rank, iteration)`` (the on-device augmentation, shuffling BN, random boxes draw from
  them), and the data stream starts at the resumed iteration with each sample's augmentation
  seeded by its position (:mod:`insloc_detco.data.sampler`). A run stopped at iteration ``i``
  and resumed therefore ends bit-equal to an uninterrupted one on the same hardware (tested on
  the CPU with 2 gloo processes).
* **Same run.** A start that finds checkpoints in ``OUTPUT_DIR`` resumes from them by itself
  only if they were written with this config (keys that change no result, such as the
  checkpoint period or the loader workers, are not compared); otherwise it stops and names the
  differences. ``--resume`` continues anyway (e.g. with a longer ``SOLVER.MAX_ITER``); a new
  ``OUTPUT_DIR`` starts afresh.
"""

import logging

from detectron2.engine import HookBase
from detectron2.utils import comm

from ..data.sampler import derive_seed, seed_all
from ..transfer.trial_state import config_differences

__all__ = ["ConfigMismatchError", "RunStateHook", "RESUME_IGNORED_KEYS"]

logger = logging.getLogger(__name__)

# Keys that do not change what a run computes: they may differ between a run and its resume.
RESUME_IGNORED_KEYS = (
    "OUTPUT_DIR",
    "MODEL.DEVICE",
    # How the step runs, not what it computes (equal to eager within tests/test_fast_path.py's
    # tolerance; the same parameter names and optimizer state).
    "MODEL.FAST_PATH.ENABLED",
    "MODEL.FAST_PATH.BACKEND",
    "MODEL.FAST_PATH.COMPILE_MODE",
    "DATALOADER.NUM_WORKERS",
    "DATALOADER.MAIN_PROCESS_THREADS",
    "SOLVER.CHECKPOINT_PERIOD",
    "SOLVER.CHECKPOINT_MAX_TO_KEEP",
    "SOLVER.LOG_PERIOD",
    "SOLVER.PLOT_CURVES",
    "VIS_PERIOD",
    "CUDNN_BENCHMARK",
)
_TAG_STEP = 3  # apart from the data stream's tags (insloc_detco.data.sampler)


class ConfigMismatchError(ValueError):
    """``OUTPUT_DIR`` holds checkpoints of another config."""


class RunStateHook(HookBase):
    """
    The run's seed and config in checkpoints; per-step seeding; the data stream's start (see
    the module docstring). ``require_same_config``: a resumed checkpoint of another config (or
    of none recorded) is an error; set by the trainer's ``resume_or_load``.
    """

    def __init__(self, sampler, config_yaml: str):
        """
        Args:
            sampler: the loader's :class:`ResumableTrainingSampler` (its seed is the run's);
                None for a loader without one (its stream then restarts on resume).
            config_yaml: the run's resolved config (``cfg.dump()``).
        """
        self._sampler = sampler
        self.seed = sampler.seed if sampler is not None else comm.shared_random_seed()
        self._config = config_yaml
        self.require_same_config = False
        self.resumed_config = None  # the config a loaded checkpoint recorded

    def state_dict(self):
        return {"seed": self.seed, "config": self._config}

    def load_state_dict(self, state):
        self.seed = int(state["seed"])
        self.resumed_config = state.get("config", "")
        self.check_config(self.resumed_config)

    def check_config(self, recorded):
        """Raise :class:`ConfigMismatchError` if ``require_same_config`` and ``recorded`` (the
        resumed checkpoint's config, None if it recorded none) differs from this run's."""
        if not self.require_same_config:
            return
        folder = self.trainer.cfg.OUTPUT_DIR
        if recorded is None:
            raise ConfigMismatchError(
                f"{folder} holds a checkpoint that records no config (written before configs "
                "were recorded), so it cannot be resumed automatically: add --resume to continue "
                "from it with this config, or set another OUTPUT_DIR to start afresh."
            )
        diff = config_differences(recorded, self._config, RESUME_IGNORED_KEYS)
        if diff:
            listing = "; ".join(diff[:8]) + ("; ..." if len(diff) > 8 else "")
            raise ConfigMismatchError(
                f"{folder} holds checkpoints of another config ({len(diff)} differences, "
                f"checkpoint -> now: {listing}). Set another OUTPUT_DIR to start this config "
                "afresh, or add --resume to continue the checkpoint with the new config."
            )

    def before_train(self):
        if self._sampler is not None:
            self._sampler.set_start(self.seed, self.trainer.start_iter)

    def before_step(self):
        seed_all(derive_seed(self.seed, _TAG_STEP, comm.get_rank(), self.trainer.iter))
