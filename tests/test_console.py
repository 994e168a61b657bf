"""A quiet console: the library noise kit/console.py names is dropped, other warnings still print,
and INFO lines come from rank 0 only (torchtitan logs on the root logger from every rank)."""

import os
import subprocess
import sys

from kit import console

SCRIPT = """
import logging, warnings
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
import kit  # installs the filters
import torchao  # its optional GPU kernels fail to load here, and it registers Enums with torch's pytree
warnings.warn("DTensor random operators may not have complete support on cpu device mesh", UserWarning)
warnings.warn("In CPU autocast, but the target dtype is not supported. Disabling autocast.", UserWarning)
warnings.warn("a warning nobody listed", UserWarning)
logging.getLogger().info("an INFO line")
logging.getLogger().warning("a WARNING line")
"""


def run_as(rank: str) -> str:
    env = {**os.environ, "RANK": rank}
    p = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stdout + p.stderr


def test_named_noise_is_dropped_and_the_rest_prints():
    out = run_as("0")
    for _, message in console.KNOWN_WARNINGS:
        assert message not in out, out
    for _, fragment in console.KNOWN_LOG_LINES:
        assert fragment not in out, out
    assert "a warning nobody listed" in out and "an INFO line" in out and "a WARNING line" in out, out


def test_info_lines_from_rank_0_only(monkeypatch):
    import logging
    rank0 = [f for f in logging.getLogger().filters if isinstance(f, console._Rank0Info)]
    assert rank0, "kit's import installs the rank filter on the root logger (torchtitan's)"

    def record(level):
        return logging.LogRecord("root", level, __file__, 1, "a line", None, None)
    monkeypatch.setenv("RANK", "1")
    assert not rank0[0].filter(record(logging.INFO)) and rank0[0].filter(record(logging.WARNING))
    monkeypatch.setenv("RANK", "0")
    assert rank0[0].filter(record(logging.INFO))


CAPTURE = """
import subprocess, sys
from pathlib import Path
from loguru import logger
from kit import console
logger.remove(); logger.add(sys.stderr)  # a sink bound to sys.stderr, as datatrove adds one per task
log = Path(sys.argv[1])
print("before")
with console.output_to(log):
    print("stdout inside"); logger.info("loguru inside")
    subprocess.run([sys.executable, "-c", "import sys; print('child out'); print('child err', file=sys.stderr)"])
print("after")
try:
    with console.output_to(log, tail_lines=2):
        print("line 1"); print("line 2"); print("line 3")
        raise RuntimeError("the step failed")
except RuntimeError:
    print("caught")
"""


def test_output_to_sends_process_and_children_output_to_the_file_and_a_failure_shows_its_tail(tmp_path):
    log = tmp_path / "logs" / "step.log"
    p = subprocess.run([sys.executable, "-c", CAPTURE, str(log)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["before", "after", "caught"], p.stdout
    assert p.stderr.splitlines() == ["line 2", "line 3", f"(the whole output: {log})"], p.stderr
    kept = log.read_text()
    for line in ("stdout inside", "loguru inside", "child out", "child err", "line 1"):
        assert line in kept, (line, kept)
