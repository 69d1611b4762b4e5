"""Logs that tell the whole story: our loggers, warnings, plain text, errors of every rank."""

import logging
import os
import warnings

import pytest

from insloc_detco.engine import setup_logging
from insloc_detco.warning_filters import (
    KNOWN_THIRD_PARTY_LOG_RECORDS,
    KNOWN_THIRD_PARTY_WARNINGS,
    ignore_known_third_party_warnings,
)


@pytest.fixture
def logs(tmp_path):
    """setup_logging into tmp_path; the handlers it added are removed afterwards."""
    names = ("detectron2", "fvcore", "insloc_detco", "py.warnings")
    before = {n: list(logging.getLogger(n).handlers) for n in names}
    # An entry script's main() run in this process by an earlier test (eval_readout.py,
    # eval_transfer.py) captured warnings inside pytest's own capture, which has since put
    # its showwarning back: start from no capture, as a fresh process does.
    logging.captureWarnings(False)
    yield str(tmp_path)
    logging.captureWarnings(False)
    for n in names:
        for h in logging.getLogger(n).handlers:
            if h not in before[n]:
                logging.getLogger(n).removeHandler(h)


def _read(path):
    for name in ("detectron2", "insloc_detco", "py.warnings"):
        for h in logging.getLogger(name).handlers:
            if not getattr(getattr(h, "stream", None), "closed", False):  # other tests' stdout
                h.flush()
    with open(path) as f:
        return f.read()


def test_our_lines_and_warnings_reach_log_txt_as_plain_text(logs, capsys):
    setup_logging(logs, 0)
    logging.getLogger("insloc_detco.data.build").info("Pretraining on 18 images")
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # pytest's settings ignore UserWarning
        warnings.warn("Skipping unreadable image x.jpg", UserWarning)
    yaml = "\x1b[38;5;204mSOLVER\x1b[39m\x1b[38;5;255m:\x1b[39m"  # what detectron2 logs
    logging.getLogger("detectron2").info("Running with full config:\n" + yaml)
    model = "Model:\nMoCoV2(\n" + "  (layer): Conv2d()\n" * 30 + ")\nParameters: 1.0M trained"
    logging.getLogger("insloc_detco.engine.trainer").info(model)
    text = _read(os.path.join(logs, "log.txt"))
    assert "insloc_detco.data.build INFO: Pretraining on 18 images" in text
    assert "py.warnings WARNING" in text and "Skipping unreadable image x.jpg" in text
    assert "Running with full config:\nSOLVER:" in text and "\x1b" not in text
    assert model in text  # in full in the file
    console = capsys.readouterr().out
    assert "\x1b" not in console  # the console is not a terminal here
    assert "Model: MoCoV2( ... ) 33 lines, in log.txt. Parameters: 1.0M trained" in console
    assert "(layer)" not in console


def test_errors_of_other_ranks_reach_the_console_and_log_txt(logs, capfd):
    setup_logging(logs, 1)  # what rank 1 of a multi-process run does
    try:
        raise FloatingPointError("Loss became infinite or NaN at iteration=7!")
    except FloatingPointError:
        logging.getLogger("detectron2.engine.train_loop").exception("Exception during training:")
    err = capfd.readouterr().err
    main_log = _read(os.path.join(logs, "log.txt"))
    for text in (err, main_log):
        assert "rank 1" in text and "Exception during training:" in text
        assert "FloatingPointError: Loss became infinite or NaN at iteration=7!" in text
    assert "Loss became infinite" in _read(os.path.join(logs, "log.txt.rank1"))


def test_only_the_known_third_party_warnings_are_ignored():
    message, category, _ = KNOWN_THIRD_PARTY_WARNINGS[0]
    text = message.replace("\\", "") + ". Please switch to `torch.compile`."
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        ignore_known_third_party_warnings()
        warnings.warn_explicit(text, category, "_script.py", 1, module="torch.jit._script")
        warnings.warn_explicit(text, category, "ours.py", 1, module="insloc_detco.engine")
        warnings.warn_explicit(
            "something else", category, "_script.py", 2, module="torch.jit._script"
        )
    assert [(str(w.message), w.filename) for w in caught] == [
        (text, "ours.py"),
        ("something else", "_script.py"),
    ]


def test_only_the_known_third_party_log_records_are_dropped(caplog):
    ignore_known_third_party_warnings()
    name, prefix = KNOWN_THIRD_PARTY_LOG_RECORDS[0]
    with caplog.at_level(logging.WARNING, logger=name):
        logging.getLogger(name).warning(prefix + " for both fx.symbolic_trace and torch.export.")
        logging.getLogger(name).warning("another message")
        logging.getLogger("insloc_detco.x").warning(prefix + " (ours)")
    assert [r.getMessage() for r in caplog.records] == ["another message", prefix + " (ours)"]
