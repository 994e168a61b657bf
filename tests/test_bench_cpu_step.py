"""Smoke: bench/cpu_step.py runs end to end (kit + transformers reference) on a toy size.

No timing assertions: the machine is shared. Checks the table and equal parameter counts.
"""

import re
import subprocess
import sys
from pathlib import Path

from conftest import child_env

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_step_bench_runs():
    cmd = [sys.executable, str(ROOT / "bench" / "cpu_step.py"), "--batch", "2", "--seq", "16", "--steps", "1",
           "--warmup", "1", "--threads", "1", "--expert-gemm-dtype", "bfloat16",
           "model.dim=64", "model.vocab_size=512", "model.dense_hidden_dim=96", "model.moe_hidden_dim=32"]
    env = child_env()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for row in ("ours ", "reference ", "ours+mtp ", "ours (experts bfloat16) ", "ratio ours/reference"):
        assert row in out.stdout, out.stdout
    ours, ref = re.search(r"params: ours ([\d,]+) .*reference ([\d,]+)", out.stdout).groups()
    assert ours == ref  # same architecture on both sides
