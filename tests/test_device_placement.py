"""Issue 17 item 3: every tensor that meets the model or enters one of its collectives lives on
the model's device. tests/dist_device_placement.py runs one pre-training step, one RL step (the
local rollout backend's decode included) and one evaluation decode with the model on the meta
device of a fake 2-rank world, under a dispatch mode that fails on a CPU tensor given to a
collective or mixed into the model's ops, as CUDA and NCCL would."""

import subprocess
import sys

import pytest
from conftest import ROOT, child_env


@pytest.mark.slow
def test_train_rl_and_evaluation_keep_every_tensor_on_the_model_device(tiny_data):
    out = subprocess.run([sys.executable, "tests/dist_device_placement.py"], cwd=ROOT, env=child_env(),
                         capture_output=True, text=True, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("DEVICE-")]
    assert out.returncode == 0 and lines and lines[-1].startswith("DEVICE-OK"), \
        (lines[-1] if lines else out.stderr[-3000:])
    assert '"steps": ["pretrain", "rl", "evaluate"]' in lines[-1]


def test_process_group_backend_puts_cpu_collectives_on_gloo_beside_nccl():
    from omegaconf import OmegaConf
    from kit import training

    assert training.process_group_backend(OmegaConf.create({"device": "cuda", "backend": "nccl"})) == "cpu:gloo,cuda:nccl"
    assert training.process_group_backend(OmegaConf.create({"device": "cpu", "backend": "gloo"})) == "gloo"


def test_flex_compile_mode_reaches_torchtitans_flex_attention():
    """hardware.flex_compile replaces the compiled flex_attention torchtitan calls at run time
    (FlexAttention._compiled_flex_attn) and the options its regional-inductor path reads."""
    from torchtitan.models.common.attention import FlexAttention
    import kernels

    before = FlexAttention._compiled_flex_attn
    try:
        kernels.set_flex_compile("default")
        assert FlexAttention.inductor_configs["max_autotune"] is False
        assert FlexAttention._compiled_flex_attn is not before
        kernels.set_flex_compile("max-autotune")
        assert FlexAttention.inductor_configs["max_autotune"] is True
        assert FlexAttention.inductor_configs["coordinate_descent_tuning"] is True
        with pytest.raises(ValueError, match="hardware.flex_compile='fast'"):
            kernels.set_flex_compile("fast")
    finally:
        kernels.set_flex_compile("max-autotune")  # torchtitan's own setting
