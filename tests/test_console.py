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
