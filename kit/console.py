"""A quiet console: the library messages every stage and rank would print, each named here and
dropped, and INFO lines from rank 0 only (torchtitan logs on the root logger from every rank).

Installed once per process when the kit is imported (kit/__init__.py), before torch, torchtitan
or torchao are: the torchao and _pytree lines come at their import. Filters match a message and a
category or logger, never all warnings; anything not listed here still prints.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path

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


@contextlib.contextmanager
def output_to(path: Path, tail_lines: int = 20):
    """Run the block with this process's stdout and stderr (file descriptors 1 and 2, so child
    processes and loguru sinks too) appended to `path`. For libraries whose console output is a
    per-task log the kit keeps anyway (datatrove prints every task's banner, pipeline drawing and
    stats table, which its own logs folder also holds): the stage prints one summary line instead.
    If the block raises, the last `tail_lines` lines and the file's path reach the console."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    failed = False
    try:
        with open(path, "ab") as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield path
            except BaseException:
                failed = True
                raise
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        if failed:
            tail = path.read_text(errors="replace").splitlines()[-tail_lines:]
            print("\n".join(tail + [f"(the whole output: {path})"]), file=sys.stderr, flush=True)
