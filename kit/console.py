"""A quiet console: the library messages every stage and rank would print, each named here and
dropped, and INFO lines from rank 0 only (torchtitan logs on the root logger from every rank).

Installed once per process when the kit is imported (kit/__init__.py), before torch, torchtitan
or torchao are: the torchao and _pytree lines come at their import. Filters match a message and a
category or logger, never all warnings; anything not listed here still prints.
"""

from __future__ import annotations

import logging
import os
import warnings

# (warning category, message regex): library warnings that say nothing about the run.
KNOWN_WARNINGS = [
    # DTensor on a CPU mesh: the kit seeds parameters itself (training.build_model_parts)
    (UserWarning, r"DTensor random operators may not have complete support on cpu device mesh"),
    # torchtitan's MoE router asks for an FP32 autocast region; on CPU that is the default anyway
    (UserWarning, r"In CPU autocast, but the target dtype is not supported"),
]

# (logger name, message fragment): library log lines, not warnings.
KNOWN_LOG_LINES = [
    # torchao's optional native kernels (MXFP8, CUTLASS SM90a) are GPU builds; the kit uses neither
    ("torchao", "Failed to load"),
    # torchao registers its Enums with torch's pytree, which torch now deprecates (once per Enum)
    ("torch.utils._pytree", "register_constant() on Enum subclasses is deprecated"),
]


class _DropMessages(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in str(record.msg)


class _Rank0Info(logging.Filter):
    """INFO and below from rank 0 only; warnings and errors from every rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or os.environ.get("RANK", "0") == "0"


_installed = False


def quiet() -> None:
    """Install the filters above (idempotent). Logger filters outlive Hydra's logging set-up,
    which replaces handlers but keeps the filters of loggers it does not configure."""
    global _installed
    if _installed:
        return
    _installed = True
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, fragment in KNOWN_LOG_LINES:
        logging.getLogger(name).addFilter(_DropMessages(fragment))
    logging.getLogger().addFilter(_Rank0Info())  # torchtitan's logger is the root logger
