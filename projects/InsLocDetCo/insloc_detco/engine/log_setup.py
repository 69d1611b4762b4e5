"""Logging of a training process, so that ``log.txt`` and the console tell the whole story.

detectron2's ``default_setup`` sets up its own and fvcore's loggers only: our INFO lines (data
set size, schedule, curves, weights written) went nowhere, and warnings reached stderr without a
timestamp and never reached ``log.txt``. It also writes the config dumps with terminal colour
codes, into ``log.txt`` too, and only rank 0 logs to the console: an exception on another rank
stayed in ``log.txt.rank<k>``. The full config (~400 lines) and the model (~300-500 lines) made
most of the console output; they stay in ``log.txt``, the console names them in a line.
"""

import contextlib
import copy
import functools
import logging
import os
import re
import sys
from typing import Optional, Sequence

from detectron2.utils.logger import setup_logger

__all__ = ["setup_logging", "log_to_file", "log_exceptions", "strip_colour_codes"]

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_LOGGERS = ("detectron2", "fvcore", "insloc_detco", "py.warnings")

logger = logging.getLogger(__name__)


def setup_logging(output_dir: Optional[str], rank: int = 0):
    """
    Set up the loggers of a training process; call it before detectron2's ``default_setup``
    (which then reuses them: ``setup_logger`` is cached on its arguments). ``output_dir``
    None: the console only (evaluation runs, whose result files say what they did).

    * ``detectron2``, ``fvcore``, ``insloc_detco`` and Python warnings (``py.warnings``, with a
      timestamp) go to the console on rank 0 and to ``<output_dir>/log.txt``
      (``log.txt.rank<k>`` on rank k), as detectron2 does for its own.
    * No ANSI colour codes in files, nor on a console that is not a terminal.
    * On the console, the full config and the model are a line each (they are in ``log.txt``).
    * On ranks > 0, errors (an exception's traceback) also go to the console (stderr) and to
      rank 0's ``log.txt``.
    """
    setup_logger(output_dir, distributed_rank=rank, name="fvcore")  # as default_setup calls it
    setup_logger(output_dir, distributed_rank=rank)
    setup_logger(output_dir, distributed_rank=rank, name="insloc_detco")
    logging.captureWarnings(True)
    setup_logger(output_dir, distributed_rank=rank, name="py.warnings", abbrev_name="warnings")
    for name in _LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if getattr(handler, "stream", None) in (sys.stdout, sys.stderr):
                _wrap(handler, _ConsoleSummary)
            strip_colour_codes(handler)
    if rank > 0:
        _errors_to_main_log(output_dir, rank)


@contextlib.contextmanager
def log_to_file(path: str):
    """Add a file handler (DEBUG and up) to our loggers for the duration of the block."""
    handler = logging.FileHandler(path)
    handler.setFormatter(
        logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s", "%m/%d %H:%M:%S")
    )
    handler.setLevel(logging.DEBUG)
    loggers = [logging.getLogger(n) for n in ("detectron2", "fvcore", "insloc_detco")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
        handler.close()


def strip_colour_codes(handler: logging.Handler):
    """Make ``handler`` write plain text, unless it writes to a terminal."""
    stream = getattr(handler, "stream", None)
    if stream is None or isinstance(handler.formatter, _PlainText):
        return
    if _is_terminal(stream):
        return
    _wrap(handler, _PlainText)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _wrap(handler: logging.Handler, wrapper):
    if not isinstance(handler.formatter, wrapper):
        handler.setFormatter(wrapper(handler.formatter or logging.Formatter()))


@contextlib.contextmanager
def log_exceptions(what: str, log: logging.Logger = logger):
    """Log an exception escaping the block (with its traceback) before it propagates."""
    try:
        yield
    except Exception:
        log.exception(f"{what} failed:")
        raise


class _PlainText(logging.Formatter):
    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return _ANSI.sub("", self.inner.format(record))


class _ConsoleSummary(logging.Formatter):
    """The full config and the model printout as one line each; other records unchanged."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        lines = message.count("\n")
        if lines > 20 and message.startswith("Running with full config:"):
            short = f"Running with full config: {lines} lines, in log.txt and config.yaml."
        elif lines > 20 and message.startswith("Model:\n"):
            body = message.splitlines()
            short = f"Model: {body[1]} ... ) {lines} lines, in log.txt. {body[-1]}"
        else:
            return self.inner.format(record)
        record = copy.copy(record)
        record.msg, record.args = short, None
        return self.inner.format(record)


@functools.lru_cache()  # once per process and folder
def _errors_to_main_log(output_dir: str, rank: int, names: Sequence[str] = _LOGGERS):
    formatter = logging.Formatter(
        f"[%(asctime)s rank {rank} %(name)s] %(levelname)s: %(message)s", "%m/%d %H:%M:%S"
    )
    handlers = [logging.StreamHandler(sys.stderr)]
    if output_dir:
        log_file = output_dir
        if not (output_dir.endswith(".txt") or output_dir.endswith(".log")):
            log_file = os.path.join(output_dir, "log.txt")
        handlers.append(logging.FileHandler(log_file, mode="a"))
    for handler in handlers:
        handler.setLevel(logging.ERROR)
        handler.setFormatter(formatter)
        for name in names:
            logging.getLogger(name).addHandler(handler)
