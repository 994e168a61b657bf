"""`make gpu-check` (issue 17 item 4) where there is no GPU: scripts/gpu_check.sh stops in one
line, and bench/gpu_step.py's code runs on the tiny shapes on the CPU so it cannot rot."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, child_env


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: make gpu-check runs for real")
def test_gpu_check_stops_in_one_line_without_a_gpu():
    out = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=child_env(PYTHON=sys.executable),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout.strip().count("\n") == 0 and "no CUDA GPU" in out.stdout


def test_gpu_step_bench_on_cpu_tiny_prints_its_figures():
    out = subprocess.run([sys.executable, "bench/gpu_step.py", "--device", "cpu", "--tiny", "--warmup", "0",
                          "--iters", "1"], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["shapes"]["local_experts"] == 16 // 2 and res["shapes"]["seq_len"] == 128  # tiny x cpu_fsdp_ep
    for key in ("tokens_per_s", "tflops", "mfu", "peak_mem_bytes", "predicted_mem_bytes"):
        assert res[key] > 0, key
    assert res["grouped_gemm"]["grouped_mm_bf16_vs_fp32_max_rel_err"] < 2e-2  # bf16 rounding, not a wrong GEMM
    # the kit's block ran (this torch has every name the kit uses) and is the headline; recomputation (`paper`) keeps less for backward than none
    assert isinstance(res["kit_bf16_none"], dict), res["kit_bf16_none"]
    assert res["peak_mem_bytes"] == res["kit_bf16_none"]["peak_mem_bytes"]
    assert res["kit_bf16_paper"]["peak_mem_bytes"] < res["kit_bf16_none"]["peak_mem_bytes"]

