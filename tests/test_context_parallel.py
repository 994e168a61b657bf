"""Context parallel for MLA (context_parallel.py): sharding, masks, one layer against full
attention on 2 gloo ranks, and CP 2 x EP 2 pre-training against one rank."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, compose_cfg, free_port

from kit import config_checks
from kit import context_parallel
import kernels
from test_pretrain_dist import losses, run

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def packed_positions(starts_per_row: list[list[int]], L: int) -> torch.Tensor:
    pos = torch.zeros(len(starts_per_row), L, dtype=torch.long)
    for b, ss in enumerate(starts_per_row):
        for s, e in zip(ss, ss[1:] + [L]):
            pos[b, s:e] = torch.arange(e - s)
    return pos


def test_headtail_chunks_cover_the_row_once_and_balance_causal_work():
    L, cp = 64, 4
    idx = [context_parallel.headtail_index(L, cp, r) for r in range(cp)]
    assert sorted(torch.cat(idx).tolist()) == list(range(L))
    assert idx[1].tolist() == list(range(8, 16)) + list(range(48, 56))  # chunk 1 and chunk 2*4-1-1
    work = [int((i + 1).sum()) for i in idx]  # keys a query sees under a causal mask
    assert len(set(work)) == 1, work
    with pytest.raises(ValueError, match="multiple of 2\\*cp=8"):
        context_parallel.headtail_index(60, cp, 0)


def test_cp_masks_are_the_full_mask_rows_of_the_local_queries():
    # documents cross the chunk borders (16, 32, 48 for cp=2, L=64)
    pos = packed_positions([[0, 13, 40], [0, 5, 30, 33]], 64)
    full = kernels.document_causal_mask(pos)  # (B, 1, L, L), the single-rank mask
    doc = context_parallel.document_ids(pos)
    for r in range(2):
        q = context_parallel.headtail_index(64, 2, r)
        dense = context_parallel.dense_mask(q, doc)
        assert torch.equal(dense, full[:, :, q, :])
        # the flex mask_mod (GPU kernel) decides every (b, q, kv) the same way
        mod = context_parallel.cp_mask_mod(q, doc)
        b, qi, kv = torch.meshgrid(torch.arange(2), torch.arange(q.numel()), torch.arange(64), indexing="ij")
        assert torch.equal(mod(b, None, qi, kv), dense[:, 0])


def test_flex_attention_with_the_cp_block_mask_equals_sdpa_forward():
    # flex attention runs its forward on CPU (eager, uncompiled): the BlockMask built from global
    # indices gives SDPA's output with the dense mask.
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch.manual_seed(0)
    pos = packed_positions([[0, 100, 200], [0, 37]], 256)
    doc = context_parallel.document_ids(pos)
    q_index = context_parallel.headtail_index(256, 2, 1)
    q = torch.randn(2, 4, q_index.numel(), 16)
    k, v = torch.randn(2, 4, 256, 16), torch.randn(2, 4, 256, 16)
    bm = create_block_mask(context_parallel.cp_mask_mod(q_index, doc), 2, None, q_index.numel(), 256, device="cpu")
    out_flex = flex_attention(q, k, v, block_mask=bm)
    out_sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=context_parallel.dense_mask(q_index, doc))
    assert (out_flex - out_sdpa).abs().max() < 1e-5


def test_cp_mla_equals_full_attention_forward_and_gradients():
    """One tiny MLA layer on 2 gloo ranks (CP 2), packed rows whose documents cross the chunk
    borders, against the same layer on the full rows: output, input gradient, and parameter
    gradients summed over the ranks (as FSDP sums them). Also: the bytes the all-gather and its
    backward reduce-scatter sent are the latent's, (kv_lora_rank + qk_rope_head_dim) per token."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(TORCHRUN + ["--nproc_per_node", "2", "--master_port", str(free_port()),
                                   "tests/dist_cp_attention.py"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("CPCHECK "))[8:])
    # fp32 with the same kernels on both sides: only the key order inside SDPA's reduction differs.
    # Measured: out 0, input grad 3e-8 (outputs ~0.09), parameter grads 5e-7 relative.
    assert r["out"] < 1e-6 * max(1.0, r["out_scale"]) * 10, r
    assert r["x_grad"] < 1e-6, r
    assert r["param_grad_rel"] < 1e-5, r
    assert r["traffic"]["allgather_bytes"] == r["expected_allgather_bytes"], r
    assert r["traffic"]["reduce_scatter_bytes"] == r["expected_allgather_bytes"], r


def test_torchtitan_cp_hooks_the_kit_steps_around_are_still_there():
    """context_parallel.parallelize hides CP from parallelize_deepseekv3 because its only CP step
    there installs apply_cp_to_forward (a per-head K/V all-gather); AXK1Model.Config hides it from
    MTPDecoder's refusal. When torchtitan drops either, this fails: remove the workaround."""
    from torchtitan.models.deepseek_v3 import parallelize_deepseekv3
    from torchtitan.models.deepseek_v3.mtp import MTPDecoder

    assert "apply_cp_to_forward" in parallelize_deepseekv3.__code__.co_names
    assert "context_parallel_degree" in MTPDecoder.Config.update_from_config.__code__.co_names


def test_cp_sizes_ep_dispatch_buffers_for_the_local_tokens():
    """With MTP and CP the model config bypasses torchtitan's MTP/CP refusal by presenting cp=1;
    the DeepEP dispatcher must still be sized for seq_len/cp tokens per rank (micro 4 x 512 / 2)."""
    import dataclasses

    from torchtitan.config import ParallelismConfig, TrainingConfig

    import model as axk1

    cfg = axk1.build_model_config(axk1.load_model_cfg("tiny"), attention="sdpa", moe_comm_backend="deepep")

    class Runtime:
        parallelism = ParallelismConfig(context_parallel_degree=2, expert_parallel_degree=2)
        training = TrainingConfig(seq_len=512, local_batch_size=4)
    cfg.update_from_config(config=Runtime())
    caps = {layer.moe.routed_experts.token_dispatcher.num_max_tokens_per_rank
            for layer in cfg.layers + cfg.mtp_layers if layer.moe is not None}
    assert caps == {4 * 512 // 2}, caps
    assert Runtime.training.seq_len == 512 and dataclasses.is_dataclass(Runtime.training)  # caller's config untouched


def test_cp_layouts_validate_with_mtp_and_sdpa():
    cfg = compose_cfg(overrides=["parallelism=cpu_cp_ep", "stage=pretrain_s3_16k"])
    assert config_checks.errors(cfg, 2) == [] and config_checks.loop_errors(cfg) == []
    bad = compose_cfg(overrides=["parallelism=cpu_cp_ep", "stage=pretrain_s3_16k", "hardware.attention=varlen"])
    assert any("cp=2: context parallel runs with hardware.attention=sdpa or flex" in e for e in config_checks.errors(bad, 2))
    sft = compose_cfg("sft", overrides=["parallelism=cpu_cp_ep"])
    assert config_checks.loop_errors(sft) == [
        "parallelism/cpu_cp_ep.yaml cp=2: stage/sft_instruct.yaml (kind sft) does not shard sequences for context "
        "parallel (only pretrain stages do); use cp=1"]


# 6 steps of 8 rows x 256 tokens (4 chunks of 64, two per CP rank) of the long-context data
# (several documents per row); stage 1's settings (MTP scale 0.3, router-bias update 1e-3, aux loss
# 1e-4) so every term of the loss and the bias hook are on.
CP_RUN = ["stage.data_stage=pretrain_s3", "stage.budget.tiny.seq_len=256", "stage.budget.tiny.tokens=12288",
          "stage.budget.tiny.batch_start=8", "stage.budget.tiny.batch_end=8", "stage.budget.tiny.batch_increment=0",
          "log_every=3"]


@pytest.fixture(scope="module")
def cp_reference(tmp_path_factory, tiny_data):
    """One process on the full rows; its saved start is what every CP run loads."""
    import data

    cfg = compose_cfg(overrides=CP_RUN + [f"data.root={tiny_data}"])
    assert cfg.stage.bias_update_rate > 0 and cfg.model.aux_loss_alpha > 0 and cfg.model.num_mtp_layers == 1
    # The rows are packed with several documents, and documents run across the CP chunk borders.
    loader = data.build_pretrain_loader(cfg.data, stage=cfg.stage.data_stage, seq_len=256, dp_rank=0, dp_size=1,
                                        seed=cfg.seed)
    pos = loader.next_batch(8)["positions"]
    multi = (pos[:, 1:] == 0).any(dim=1)  # rows holding more than one document
    crossing = (pos[:, [64, 128, 192]] != 0).any(dim=1)  # a document runs across a chunk border
    assert int((multi & crossing).sum()) >= 2, pos
    one = tmp_path_factory.mktemp("cp_one")
    run(one, 1, CP_RUN + ["parallelism=none", "checkpoint.save_initial=true"], free_port())
    return one


@pytest.mark.slow
@pytest.mark.parametrize("nproc,layout", [
    (2, ["parallelism=cpu_cp_ep"]),                                             # CP 2 x EP 2
    (4, ["parallelism=cpu_pp", "parallelism.cp=2", "parallelism.ep=2"]),        # PP 2 x CP 2 x EP 2
], ids=["cp2_ep2", "pp2_cp2_ep2"])
def test_cp_matches_one_rank(tmp_path, cp_reference, nproc, layout):
    init = cp_reference / "tiny/pretrain_s1/initial"
    out = run(tmp_path, nproc, CP_RUN + layout + [f"stage.init_from={init}"], free_port())
    assert "  cp: 2\n" in (tmp_path / "tiny/pretrain_s1/config.yaml").read_text()
    a, b = losses(cp_reference), losses(tmp_path)
    assert sorted(a) == sorted(b) == list(range(1, 7)), out[-2000:]
    # Same data, start and maths; CP changes the reduction order (attention over gathered keys,
    # gradients summed over the CP ranks), EP the expert layout, PP the micro-batch split.
    # Measured: CP 2 x EP 2 every step within 2e-6, PP 2 x CP 2 x EP 2 within 2e-6 (losses
    # ~10.2-10.9). Tolerance 1e-4 per step: a key a query should not see, a target lost at a chunk
    # border or a wrong loss normalisation moves step 1 or 2 by more than that.
    diffs = [abs(a[s] - b[s]) for s in a]
    assert max(diffs) < 1e-4, list(zip(a.values(), b.values()))
