"""make dryrun on the tiny model: torch's fake process group gives an 8-rank world in one process,
each rank kind's part is built by the trainer's own code on the meta device, and the memory plan's
shard accounting adds up to the whole model. (The activation formula is checked against measured
saved-tensor bytes in tests/test_memory_features.py.)"""

import json
import subprocess
import sys

from conftest import ROOT

import model
from kit import cost_model


def dryrun(*overrides: str) -> dict:
    cmd = [sys.executable, "stages/dryrun.py", "model=tiny", "hardware=cpu", "parallelism=cpu_pp", "optim=adamw_tiny",
           "hardware.nodes=4", "parallelism.ep=2", "hydra.run.dir=.", "hydra.output_subdir=null",
           "hydra/job_logging=disabled", "hydra/hydra_logging=disabled", *overrides]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("## Dry run") and any(line.startswith("| stage |") for line in lines)
    return json.loads(lines[-1])


def test_tiny_pp2_ep2_on_8_fake_ranks_accounts_for_every_parameter():
    res = dryrun("++optim.moment_dtype=float32")
    assert res["world"] == 8 and [s["stage"] for s in res["stages"]] == [0, 1]
    m = model.load_model_cfg("tiny")
    c = cost_model.param_counts(m)
    # every FP32 shard once: 4 data-parallel ranks per stage (EP 2 x FSDP 2); the last stage
    # holds the MTP layer and its own copy of the embedding (pipeline.py)
    want = c["total_params"] + c["mtp_params"] + m.vocab_size * m.dim
    per_stage_ranks, fp32 = res["world"] // 2, 4
    assert sum(s["params"] // fp32 * per_stage_ranks for s in res["stages"]) == want
    parts = res["parts"]
    assert parts["grads"] == parts["params"] and parts["optimizer"] == 2 * parts["params"]  # fp32 moments
    assert res["per_gpu_bytes"] == sum(parts.values()) and res["fits"] is True
    assert 0 < res["mfu"] < 1


def test_bf16_moments_halve_the_optimizer_and_a_small_gpu_does_not_fit():
    res = dryrun("++optim.moment_dtype=bfloat16", "hardware.memory_gb=0.1")
    assert res["parts"]["optimizer"] == res["parts"]["params"]  # 2 x 2 bytes per fp32 (4 bytes) param
    assert res["fits"] is False and res["per_gpu_bytes"] > 0.1e9
