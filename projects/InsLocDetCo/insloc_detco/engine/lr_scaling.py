"""Scale the learning rate with a batch size given on the command line.

A recipe states its learning rate for its batch (MoCo v2: 0.03 for 256 images). When a command
line changes ``SOLVER.IMS_PER_BATCH`` and leaves ``SOLVER.BASE_LR`` alone, the recipe's lr would
otherwise be used for a batch it was not meant for (0.03 at 32 images is 8x the recipe's step).
:func:`merge_opts_scaling_lr` records the batch and lr of the config file(s) before it merges
the command line, then scales ``BASE_LR`` linearly with the batch (Goyal et al. 2017, "ImageNet
in 1 hour"), which is also what detectron2 does for ``REFERENCE_WORLD_SIZE``.

How it composes with ``REFERENCE_WORLD_SIZE``: this runs on the config as written, before the
trainer applies detectron2's ``DefaultTrainer.auto_scale_workers``. Each of the two multiplies
the batch and the lr by the same factor, so the lr per image stays the recipe's and nothing is
scaled twice: ``IMS_PER_BATCH 128`` with ``REFERENCE_WORLD_SIZE 8`` on 4 processes gives
batch 128 and lr 0.015 here, then batch 64 and lr 0.0075 there.
"""

import ast
from typing import Optional, Sequence

__all__ = ["LR_SCALING_KEY", "merge_opts_scaling_lr"]

# The switch (True by default). Configs without the key (the transfer configs keep detectron2's
# keys only) still accept it on the command line: it is taken out before the merge.
LR_SCALING_KEY = "SOLVER.SCALE_LR_WITH_BATCH"


def merge_opts_scaling_lr(cfg, opts: Sequence[str]) -> Optional[str]:
    """
    ``cfg.merge_from_list(opts)`` (in place); then, if ``opts`` changed ``SOLVER.IMS_PER_BATCH``
    but did not set ``SOLVER.BASE_LR``, and scaling is on,
    ``BASE_LR *= new batch / config file's batch``. An lr given on the command line is used as
    given.

    Returns:
        a sentence for the log saying how the lr was chosen when the batch is not the config
        file's, else None. (It is returned rather than logged because the log file's folder,
        ``OUTPUT_DIR``, is only known once the command line is merged.)
    """
    opts = list(opts)
    enabled = None
    if len(opts) % 2 == 0 and not _has_key(cfg, LR_SCALING_KEY):
        pairs = list(zip(opts[0::2], opts[1::2]))
        values = [v for k, v in pairs if k == LR_SCALING_KEY]
        if values:
            enabled = _as_bool(values[-1])
            opts = [x for k, v in pairs if k != LR_SCALING_KEY for x in (k, v)]
    recipe_batch, recipe_lr = cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR
    cfg.merge_from_list(opts)
    if enabled is None:
        enabled = cfg.SOLVER.get("SCALE_LR_WITH_BATCH", True)
    batch, lr = cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR
    if batch == recipe_batch:
        return None
    change = f"SOLVER.IMS_PER_BATCH {batch} instead of the config file's {recipe_batch}"
    reference = cfg.SOLVER.get("REFERENCE_WORLD_SIZE", 0)
    if reference:
        change += (
            f" (the total over REFERENCE_WORLD_SIZE={reference} processes: on another number, "
            "detectron2 scales batch and lr again, keeping the lr per image)"
        )
    if "SOLVER.BASE_LR" in opts[0::2]:
        return f"{change}, with SOLVER.BASE_LR {lr:g} as given."
    if not enabled:
        return (
            f"{change}: SOLVER.BASE_LR stays {lr:g}, the config file's lr for batch "
            f"{recipe_batch} ({LR_SCALING_KEY} is False)."
        )
    cfg.SOLVER.BASE_LR = recipe_lr * batch / recipe_batch
    return (
        f"{change}: SOLVER.BASE_LR scaled linearly, {recipe_lr:g} x {batch}/{recipe_batch} = "
        f"{cfg.SOLVER.BASE_LR:g} (set SOLVER.BASE_LR to choose it, or {LR_SCALING_KEY} False "
        f"to keep {recipe_lr:g})."
    )


def _has_key(cfg, dotted: str) -> bool:
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _as_bool(value) -> bool:
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
    if not isinstance(value, bool):
        raise ValueError(f"{LR_SCALING_KEY} must be True or False, not {value!r}.")
    return value
