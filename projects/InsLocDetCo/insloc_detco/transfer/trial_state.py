"""
May a transfer trial folder be resumed (or its result reused) by this command?

A trial folder records what it was started with: ``config.yaml`` (the fully resolved config)
and ``inputs.json`` (the SHA-256 of the weights file). Re-running ``eval_transfer.py run``
compares them with this command's. Same: a finished trial is reused, an unfinished one resumes
from its last checkpoint. Different, and the folder holds a checkpoint or a result: the command
stops and names the differences, because resuming would continue the old schedule (or report
the old result) under the new config; ``--force`` starts the trial again, keeping the old
folder beside it as ``trial<i>.replaced-<date>``. Different but nothing saved yet: the trial
starts again with the new config.

Keys that do not change what a trial computes are not compared: where it writes
(``OUTPUT_DIR``), where the weights file lives (``MODEL.WEIGHTS``: its content is compared),
the device, loader workers, checkpoint / visualisation periods and cuDNN autotuning.
"""

import glob
import hashlib
import json
import logging
import os
import time
from typing import Any, Dict, List

import yaml

__all__ = ["IGNORED_KEYS", "config_differences", "file_sha256", "prepare_trial_dir"]

logger = logging.getLogger(__name__)

IGNORED_KEYS = (
    "OUTPUT_DIR",
    "MODEL.WEIGHTS",
    "MODEL.DEVICE",
    "DATALOADER.NUM_WORKERS",
    "SOLVER.CHECKPOINT_PERIOD",
    "VIS_PERIOD",
    "CUDNN_BENCHMARK",
)
CONFIG_FILE, INPUTS_FILE, RESULT_FILE = "config.yaml", "inputs.json", "results.json"


def _flatten(node: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    out: Dict[str, Any] = {}
    for k, v in node.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def config_differences(old_yaml: str, new_yaml: str, ignored=IGNORED_KEYS) -> List[str]:
    """``KEY old -> new`` for every key not in ``ignored`` that differs between two dumps."""
    old, new = (_flatten(yaml.safe_load(t) or {}) for t in (old_yaml, new_yaml))
    return [
        f"{k} {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}"
        for k in sorted(set(old) | set(new))
        if k not in ignored and old.get(k) != new.get(k)
    ]


def file_sha256(path: str) -> str:
    """SHA-256 of a file ("" for no file: random initialisation)."""
    if not path:
        return ""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _has_progress(trial_dir: str) -> bool:
    """A result, or a checkpoint that ``resume_or_load(resume=True)`` would continue from."""
    return any(
        os.path.exists(os.path.join(trial_dir, name))
        for name in (RESULT_FILE, "last_checkpoint", "model_final.pth")
    ) or bool(glob.glob(os.path.join(trial_dir, "model_*.pth")))


def _differences(trial_dir: str, config_yaml: str, weights_sha256: str) -> List[str]:
    inputs_file = os.path.join(trial_dir, INPUTS_FILE)
    # Without a recorded weights digest (a folder of an older version), compare the path.
    ignored = IGNORED_KEYS if os.path.isfile(inputs_file) else set(IGNORED_KEYS) - {"MODEL.WEIGHTS"}
    with open(os.path.join(trial_dir, CONFIG_FILE)) as f:
        diffs = config_differences(f.read(), config_yaml, ignored)
    if os.path.isfile(inputs_file):
        with open(inputs_file) as f:
            old_sha = json.load(f).get("weights_sha256", "")
        if old_sha != weights_sha256:
            diffs.append(
                f"weights content (sha256 {old_sha[:12] or 'none'} -> "
                f"{weights_sha256[:12] or 'none'})"
            )
    return diffs


def prepare_trial_dir(
    trial_dir: str, config_yaml: str, weights_sha256: str, force: bool, write: bool = True
) -> str:
    """
    Args:
        trial_dir: the trial's output folder.
        config_yaml: this command's fully resolved config (``cfg.dump()``).
        weights_sha256: :func:`file_sha256` of the weights file the trial starts from.
        force: start the trial again when it was started with other inputs.
        write: change files (only one machine of a multi-machine run does).
    Returns:
        "finished" (reuse its result), "resume" or "new" (the folder is ready to train).
    Raises:
        ValueError: started with other inputs, has a checkpoint or a result, and not ``force``.
    """
    if os.path.isfile(os.path.join(trial_dir, CONFIG_FILE)):
        diffs = _differences(trial_dir, config_yaml, weights_sha256)
        if not diffs:
            return "finished" if os.path.isfile(os.path.join(trial_dir, RESULT_FILE)) else "resume"
        if _has_progress(trial_dir) and not force:
            shown = "; ".join(diffs[:6]) + (f"; ... {len(diffs)} in all" if len(diffs) > 6 else "")
            raise ValueError(
                f"{trial_dir} was started with other inputs: {shown}. Resuming it (or reusing "
                "its result) would mix them. Rerun with --force to start it again (the old "
                "folder is kept beside it), restore the old settings, or use another "
                "--output-dir."
            )
        if write and _has_progress(trial_dir):
            kept = f"{trial_dir}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(trial_dir, kept)
            logger.warning(f"{trial_dir} was started with other inputs; kept it as {kept}.")
        elif write:
            logger.info(f"{trial_dir} had saved nothing yet: starting it with the new config.")
    if write:
        os.makedirs(trial_dir, exist_ok=True)
        with open(os.path.join(trial_dir, CONFIG_FILE), "w") as f:
            f.write(config_yaml)  # fully resolved: stock tools can rerun it
        with open(os.path.join(trial_dir, INPUTS_FILE), "w") as f:
            json.dump({"weights_sha256": weights_sha256}, f)
    return "new"
