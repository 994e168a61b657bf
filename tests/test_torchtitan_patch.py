"""The one patch around torchtitan (training._patch_torchtitan_device).

Fails when the patch stops being needed (torchtitan picks the CPU by itself on a GPU-less
machine) or stops working (the names it rebinds move or are ignored)."""

import subprocess
import sys

import torch
from conftest import ROOT

from kit import training  # noqa: F401  (importing it applies the patch)

PROBE = """
import torch, torchtitan.tools.utils as u, torchtitan.distributed.parallel_dims as p
print(u.device_type, p.device_type)
"""


def test_patch_still_needed_on_a_cpu_only_machine():
    if torch.cuda.is_available():
        import pytest
        pytest.skip("a GPU is visible: torchtitan's CUDA default is right here")
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["cuda", "cuda"], (
        "torchtitan no longer defaults to CUDA on a CPU-only machine: drop training._patch_torchtitan_device")


def test_patch_makes_torchtitan_build_cpu_meshes():
    code = PROBE + """
from kit import training  # noqa: F401  (importing it applies the patch)
training._patch_torchtitan_device("cpu")
print(u.device_type, p.device_type)
from torchtitan.distributed import ParallelDims
import torch.distributed as dist, os
os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29581")
dist.init_process_group("gloo")
pd = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, world_size=1)
print(pd.build_mesh().device_type)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["cpu", "cpu", "cpu"], out.stdout
