"""Pipeline parallel for real: torchrun + gloo, the tiny model with MTP, the aux loss and the
router-bias update on, against one process on the same data from the same saved start."""

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT, compose_cfg, free_port
from test_pretrain_dist import kill_tree, launch

from kit import config_checks  # noqa: F401  (config resolvers)
from kit import pipeline

pytestmark = pytest.mark.slow


def run(runs, nproc, overrides):
    p = launch(runs, nproc, overrides, free_port())
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-4000:]
    return out


# 8 steps of 128-token rows: batch 8 for 4 steps, then 24 (the ramp; a new micro-batch count, so
# the pipeline builds a second schedule). Checkpoints at steps 4 and 8.
RAMP = ["stage.budget.tiny.tokens=16384", "stage.budget.tiny.batch_start=8", "stage.budget.tiny.batch_end=24",
        "stage.budget.tiny.batch_increment=16", "stage.budget.tiny.ramp_samples=32", "checkpoint.every_steps=4",
        "log_every=1"]
# Same per-step maths in another reduction order (micro-batch split, stage boundaries, the two
# embedding copies' gradients, EP all-to-all), so the curves agree to fp32 round-off (measured
# <= 1.2e-6 loss, <= 4.6e-6 relative gradient norm) until a near-tied top-k routing choice flips
# on a last-bit difference; the flip then stays in the curve. Measured: PP 2 (1F1B and
# interleaved) flips one layer's routing at step 4 and ends within 1.9e-3 (median 3.4e-4);
# PP 2 x EP 2 and PP 2 x CP 2 x EP 2 see no flip (all steps within 1.2e-6). The reference runs
# the pipeline runs' micro-batch size (2 rows), so per-forward GEMM shapes match.
EARLY_TOL, LOSS_TOL = 5e-5, 5e-3


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data):
    """One process, the whole model; its seeded start is what every pipeline run loads."""
    one = tmp_path_factory.mktemp("one")
    run(one, 1, RAMP + ["parallelism=none", "parallelism.micro_batch=2", "checkpoint.save_initial=true"])
    return one, one / "tiny/pretrain_s1/initial"


@pytest.fixture(scope="module")
def pp2(tmp_path_factory, reference):
    """PP 2 (1F1B) on 2 ranks from the reference's start: compared with it, and the curve the
    kill/resume drill must reproduce."""
    runs = tmp_path_factory.mktemp("pp2")
    out = run(runs, 2, RAMP + ["parallelism=cpu_pp", f"stage.init_from={reference[1]}"])
    return runs, out


def records(runs) -> dict[int, dict]:
    recs = [json.loads(line) for line in (runs / "tiny/pretrain_s1/metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs}


def assert_same_curve(ref, other, steps=range(1, 9)):
    """Steps 1-3 (before routing noise can compound): loss, pre-clip gradient norm (it sees any
    error in the gradient maths directly; AdamW would hide a constant factor in the loss) and the
    router biases within EARLY_TOL. Every step: loss within LOSS_TOL, median within LOSS_TOL / 5."""
    a, b = records(ref), records(other)
    assert sorted(b) == list(steps), sorted(b)
    diffs = [abs(a[s]["loss"] - b[s]["loss"]) for s in steps]
    detail = [(s, d, abs(a[s]["grad_norm"] / b[s]["grad_norm"] - 1)) for s, d in zip(steps, diffs)]
    for s in (1, 2, 3):
        assert diffs[s - 1] < EARLY_TOL and detail[s - 1][2] < EARLY_TOL, detail
        for layer, norm in a[s]["router_bias_norm"].items():
            assert abs(b[s]["router_bias_norm"][layer] - norm) <= EARLY_TOL * norm, (s, layer)
    assert max(diffs) < LOSS_TOL and sorted(diffs)[len(diffs) // 2] < LOSS_TOL / 5, detail
    return max(diffs)


def assert_copies_checked(out):
    # the checkpoints (steps 4 and 8) found the MTP embedding copy equal to the first stage's
    assert out.count("MTP embedding copy equals the first stage's") == 2, out[-3000:]


def test_pp2_1f1b_matches_one_process(reference, pp2):
    print("max |diff|", assert_same_curve(reference[0], pp2[0]))
    assert_copies_checked(pp2[1])


@pytest.mark.parametrize("nproc,layout", [
    (2, ["parallelism.pp_schedule=Interleaved1F1B", "parallelism.pp_stages_per_rank=2"]),  # 4 stages
    (4, ["parallelism.ep=2"]),                                                              # dp 2
], ids=["pp2_interleaved", "pp2_ep2"])  # PP 2 x CP 2 x EP 2: tests/test_context_parallel.py
def test_pipeline_matches_one_process(tmp_path, reference, nproc, layout):
    ref, init = reference
    out = run(tmp_path, nproc, RAMP + ["parallelism=cpu_pp"] + layout + [f"stage.init_from={init}"])
    print("max |diff|", assert_same_curve(ref, tmp_path))
    assert_copies_checked(out)


def test_kill_and_resume_under_pp_reproduces_the_uninterrupted_curve(tmp_path, reference, pp2):
    init = reference[1]
    ov = RAMP + ["parallelism=cpu_pp", f"stage.init_from={init}"]
    p = launch(tmp_path, 2, ov, free_port())
    ckpt = tmp_path / "tiny/pretrain_s1/checkpoints/step-00000004"
    deadline = time.time() + 600
    while not (ckpt / ".metadata").exists():  # SIGKILL the whole job right after a checkpoint
        assert p.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.2)
    time.sleep(0.5)
    kill_tree(p.pid)
    p.wait()
    assert not (tmp_path / "tiny/pretrain_s1/DONE.json").exists()
    out = run(tmp_path, 2, ov)
    assert "resumed from" in out and "layout changed" not in out
    a, b = records(pp2[0]), records(tmp_path)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(abs(a[s]["loss"] - b[s]["loss"]) < 1e-5 for s in a), [(s, a[s]["loss"], b[s]["loss"]) for s in a]


def test_resume_on_another_layout_continues_the_curve(tmp_path, reference):
    """Paper 3.4: 1,024 -> 1,536 GPUs and a larger batch. Here FSDP x EP 2 on 2 ranks writes step
    4 with the batch ramp ending at 16; PP 2 on 2 ranks resumes it with the ramp ending at 24 (the
    reference's), so steps 5-8 must follow the reference: weights, Adam moments, router biases
    and the loader's global sample position all carried over."""
    ref, init = reference
    old_ramp = [o for o in RAMP if "batch_end" not in o and "batch_increment" not in o] + \
        ["stage.budget.tiny.batch_end=16", "stage.budget.tiny.batch_increment=8"]
    run(tmp_path, 2, old_ramp + ["parallelism=cpu_fsdp_ep", "parallelism.micro_batch=2", f"stage.init_from={init}",
                                 "max_steps=4"])
    out = run(tmp_path, 2, RAMP + ["parallelism=cpu_pp", f"stage.init_from={init}"])
    assert "layout changed at step 5: world 2 (dp 2 x pp 1 x cp 1, ep 2) -> world 2 (dp 1 x pp 2 x cp 1, ep 1)" in out
    assert "batch schedule changed at step 5: [start, end, increment, ramp samples] [8, 16, 8, 32] -> " \
           "[8, 24, 16, 32]" in out
    assert_same_curve(ref, tmp_path)
    state = json.loads((tmp_path / "tiny/pretrain_s1/checkpoints/step-00000008/train_state.json").read_text())
    assert state["loader"]["samples_consumed"] == 4 * 8 + 4 * 24


def test_paper_split_holds_every_layer_once_and_balances_the_stages():
    m = compose_cfg(overrides=["model=axk1_519b", "optim=adamw"]).model
    split = pipeline.stage_split(m, 16, 4096)
    assert split[0][0] == "tok_embeddings" and split[-1][-3:] == ["norm", "lm_head", "mtp_layers.0"]
    layers = [n for stage in split for n in stage if n.startswith("layers.")]
    assert layers == [f"layers.{i}" for i in range(61)]
    chunks = pipeline.module_costs(m, 4096)
    groups = pipeline.balanced_split(chunks, 16)
    flops = [sum(chunks[k].flops for k in g) for g in groups]
    assert max(flops) / (sum(flops) / 16) < 1.25  # worst stage within 25% of the mean
    with pytest.raises(ValueError, match="duplicated"):
        pipeline.validate_split([split[0] + ["layers.5"]] + split[1:], m)


def test_mtp_embedding_copy_stays_equal_and_a_drift_is_refused():
    """tests/dist_pp_embedding.py: 3 AdamW steps (lr 1e-2) keep the copies equal; one step without
    the gradient sum makes them differ (measured 1.3e-2) and the pre-checkpoint check refuses."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "tests/dist_pp_embedding.py"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("PPCHECK "))[8:])
    assert r["initial"] == 0.0 and r["after_3_steps"] == 0.0, r
    assert r["unsynced"] > 1e-4 and r["refused"], r
