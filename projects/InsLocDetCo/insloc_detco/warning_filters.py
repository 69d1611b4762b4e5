"""Known warnings of the libraries we build on, silenced by message, category and module.

Each process printed them (torch 2.14 deprecates ``torch.jit.script``, which fvcore and
detectron2 apply at import time; detectron2's model zoo imports ``pkg_resources``; its anchor
generator calls ``torch.meshgrid`` the old way) and nothing in them is actionable for a user of
this project. Only these exact messages from these
modules are ignored; any other warning, and these from our own code, still shows (and, after
``setup_logging``, reaches ``log.txt`` with a timestamp). Installed by ``insloc_detco/__init__``
before anything imports detectron2.
"""

import logging
import warnings

__all__ = [
    "KNOWN_THIRD_PARTY_WARNINGS",
    "KNOWN_THIRD_PARTY_LOG_RECORDS",
    "ignore_known_third_party_warnings",
]

# (message regex, category, module regex of the code the warning is attributed to)
KNOWN_THIRD_PARTY_WARNINGS = (
    (r"`torch\.jit\.script` is deprecated", FutureWarning, r"torch\.jit\._script"),
    (r"pkg_resources is deprecated as an API", UserWarning, r"detectron2\.model_zoo\."),
    # detectron2's anchor generator calls torch.meshgrid without `indexing` (its default, "ij",
    # is what it means).
    (r"torch\.meshgrid: in an upcoming release", UserWarning, r"torch\.functional"),
)


# (logger, start of the message) of torch's own log warnings that are noise here.
KNOWN_THIRD_PARTY_LOG_RECORDS = (
    # Logged when detectron2 asks whether the model is being traced (its ROI pooler does).
    ("torch.fx._symbolic_trace", "is_fx_tracing will return true"),
    # Logged on a machine without CUDA when detectron2 collects its environment information.
    ("torch.utils.cpp_extension", "No CUDA runtime is found"),
)


class _DropRecords(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def ignore_known_third_party_warnings():
    for message, category, module in KNOWN_THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, prefix in KNOWN_THIRD_PARTY_LOG_RECORDS:
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropRecords) and f.prefix == prefix for f in lg.filters):
            lg.addFilter(_DropRecords(prefix))
