"""Config validation: every bad combination is refused before allocation, one line each."""

import pytest
from conftest import compose_cfg

from kit import config_checks


def errs(overrides, world=None):
    return config_checks.errors(compose_cfg(overrides=overrides), world)


def test_default_tiny_cpu_config_is_valid():
    assert errs([], world=2) == []
    assert errs(["parallelism=none"], world=1) == []


def test_paper_config_on_1024_gpus_is_valid():
    ov = ["model=axk1_519b", "optim=adamw", "hardware=h200_1024", "parallelism=axk1_pretrain"]
    assert errs(ov) == []  # PP 16 x EP 8 with the MTP layer on the last stage (pipeline.py)


@pytest.mark.parametrize("overrides,world,needle", [
    (["parallelism=cpu_fsdp_ep", "parallelism.dp_shard=2"], 3, "does not equal world size 3"),
    (["parallelism=cpu_fsdp_ep"], 3, "ep=2: expected to divide dp_shard*cp=3"),
    (["parallelism=none", "parallelism.pp=7"], 7, "7 stages for model/tiny.yaml's 6 pipeline chunks"),
    (["parallelism=cpu_fsdp_ep", "parallelism.ep=2", "model.num_experts=15", "model.n_group=5"], 2,
     "expected to divide model.num_experts=15"),
    (["parallelism=none", "parallelism.cp=2", "hardware.attention=flex", "hardware.device=cuda",
      "model.num_mtp_layers=0", "stage.budget.tiny.seq_len=130"], 2, "expected a multiple of 2*cp=4"),
    (["model.vocab_size=4000"], 2, "vocab_size=4000: expected a multiple of 128"),
    (["stage.budget.tiny.batch_start=6"], 2, "expected a multiple of dp*micro_batch"),
    (["hardware.attention=flex"], 2, "flex attention has no CPU backward"),
    (["model=axk1_519b"], 2, "pick the matching optim config"),
])
def test_each_violation_is_one_clear_line(overrides, world, needle):
    lines = errs(overrides, world)
    assert any(needle in line for line in lines), lines
    assert all("\n" not in line for line in lines)


@pytest.mark.parametrize("name,overrides,needle", [
    ("pretrain", ["optim.lr=0"], "adamw_tiny.yaml lr=0: expected a positive learning rate"),
    ("sft", ["optim.lr=-1e-3"], "lr=-0.001: expected a positive learning rate"),
    ("rl_train", ["model.top_k=0"], "top_k=0: expected at least 1 routed expert per token"),
    ("pretrain", ["stage.budget.tiny.tokens=-5"], "budget.tiny.tokens=-5: expected >= 0"),
    ("rl_train", ["stage.budget.tiny.steps=-1"], "budget.tiny.steps=-1: expected >= 0"),
    ("sft", ["stage.lr_factor=-0.1"], "lr_factor=-0.1: expected >= 0"),
    ("rl_train", ["stage.rl.rollout_backend=sglang"], "rl.yaml rl.rollout_backend=sglang: expected local or vllm"),
])
def test_unusable_values_are_refused_before_building(name, overrides, needle):
    with pytest.raises(config_checks.ConfigError) as e:
        config_checks.validate(compose_cfg(name, overrides), 2)
    lines = str(e.value).splitlines()[1:]
    assert any(needle in line for line in lines), lines


def test_1536_gpus_with_the_stage1_ramp_is_refused():
    # 1,536 GPUs with PP 16 gives 96 data-parallel ranks: the ramp's 2,048 does not divide.
    ov = ["model=axk1_519b", "optim=adamw", "hardware=h200_1536", "parallelism=axk1_pretrain",
          "model.num_mtp_layers=0"]
    lines = errs(ov)
    assert lines == ["stage/pretrain_s1.yaml global batch 2048 (of the ramp 2048->18432 step 1024): "
                     "expected a multiple of dp*micro_batch=96*1=96; past the ramp (the paper ramped on 1,024 GPUs "
                     "and grew the cluster after it, 3.3-3.4) continue here with "
                     "stage.budget.paper.batch_start=18432"], lines
    assert errs(ov + ["stage=pretrain_s2"]) == []  # 18,432 = 96 * 192 after the ramp
    assert errs(ov + ["stage.budget.paper.batch_start=18432"]) == []  # the override the line names is accepted


def test_validate_raises_with_all_lines():
    with pytest.raises(config_checks.ConfigError) as e:
        config_checks.validate(compose_cfg(overrides=["model.vocab_size=4000", "hardware.attention=flex"]), 2)
    assert str(e.value).count("\n") == 2


def test_deepep_without_the_package_stops_with_one_line(single_process_group):
    from kit import training

    cfg = compose_cfg(overrides=["parallelism=none", "parallelism.moe_comm_backend=deepep"])
    with pytest.raises(RuntimeError, match="needs DeepEP v2 \(deep_ep\), not installed here") as e:
        training.build_model(cfg, 1, bias_update_rate=1e-3, seed=0)
    assert "\n" not in str(e.value)


def test_float8_on_cpu_stops_with_one_line(single_process_group):
    from kit import training

    cfg = compose_cfg(overrides=["parallelism=none", "hardware.float8=true"])
    with pytest.raises(RuntimeError, match="float8=true needs CUDA GPUs"):
        training.build_model(cfg, 1, bias_update_rate=1e-3, seed=0)


@pytest.mark.parametrize("hw,par,stage", [
    ("h200_1024", "axk1_pretrain", "pretrain_s1"), ("h200_1536", "axk1_pretrain", "pretrain_s2"),
    ("h200_1536", "axk1_16k", "pretrain_s3_16k"), ("h200_1536", "axk1_32k", "pretrain_s3_32k"),
])
def test_paper_layouts_validate_and_run(hw, par, stage):
    ov = ["model=axk1_519b", "optim=adamw", f"hardware={hw}", f"parallelism={par}", f"stage={stage}"]
    assert errs(ov) == [] and config_checks.loop_errors(compose_cfg(overrides=ov)) == []


def test_layouts_the_loops_cannot_run_are_refused_at_start_and_submission():
    # The paper's PP 16 layouts run (pipeline.py; with CP for 16K/32K), MTP included; stages that
    # do not step a pipeline schedule refuse pp > 1 in one line.
    cfg = compose_cfg(overrides=["model=axk1_519b", "optim=adamw", "hardware=h200_1024",
                                 "parallelism=axk1_pretrain"])
    assert config_checks.errors(cfg) == [] and config_checks.loop_errors(cfg) == []
    rl = compose_cfg("rl_train", overrides=["parallelism=cpu_pp"])
    assert config_checks.loop_errors(rl) == [
        "parallelism/cpu_pp.yaml pp=2: stage/rl.yaml (kind rl) runs without pipeline parallel (only pretrain "
        "and sft stages step a schedule); use pp=1"]
    # The paper's long-context layouts (PP 16 x CP 4 / CP 8, EP 8) run too, MTP included.
    for par, stage in (("axk1_16k", "pretrain_s3_16k"), ("axk1_32k", "pretrain_s3_32k")):
        cp = compose_cfg(overrides=["model=axk1_519b", "optim=adamw", "hardware=h200_1536", f"parallelism={par}",
                                    f"stage={stage}"])
        assert config_checks.errors(cp) == [] and config_checks.loop_errors(cp) == []
    assert config_checks.loop_errors(compose_cfg(overrides=["parallelism=cpu_cp_ep", "stage=pretrain_s3_16k"])) == []
    assert config_checks.loop_errors(compose_cfg(overrides=["parallelism=cpu_fsdp_ep"])) == []


def test_pipeline_layouts_that_cannot_be_built_are_refused_in_one_line_each():
    def errs_of(*ov):
        return config_checks.errors(compose_cfg(overrides=["parallelism=cpu_pp", *ov]), 2)
    assert errs_of() == []
    assert errs_of("parallelism.pp_schedule=Interleaved1F1B", "parallelism.pp_stages_per_rank=2") == []
    assert errs_of("parallelism.pp_schedule=Bogus") == [
        "parallelism/cpu_pp.yaml pp_schedule=Bogus: not a torch.distributed.pipelining schedule "
        "(expected e.g. 1F1B, GPipe, Interleaved1F1B)"]
    assert errs_of("parallelism.pp_stages_per_rank=2") == [
        "parallelism/cpu_pp.yaml pp_stages_per_rank=2: pp_schedule=1F1B runs one stage per rank; expected 1 "
        "(or an interleaved schedule)"]
    assert errs_of("parallelism.pp_schedule=Interleaved1F1B", "parallelism.pp_stages_per_rank=4") == [
        "parallelism/cpu_pp.yaml pp=2 x pp_stages_per_rank=4: 8 stages for model/tiny.yaml's 6 pipeline chunks "
        "(embedding, 4 layers, head + MTP); expected at most 6"]
    assert len(errs_of("parallelism.pp_schedule=ZBVZeroBubble", "parallelism.pp_stages_per_rank=2")) == 1


def test_fsdp_ep_layout_runs_the_paper_model_on_1024_gpus():
    cfg = compose_cfg(overrides=["model=axk1_519b", "optim=adamw", "hardware=h200_1024", "parallelism=axk1_fsdp_ep"])
    assert config_checks.errors(cfg) == [] and config_checks.loop_errors(cfg) == []
    assert config_checks.mesh_degrees(cfg, 1024)["dp"] == 1024
