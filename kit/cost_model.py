"""Analytic model of A.X K1 training cost: parameters, FLOPs, and a per-step time model.

Everything here is derived from the shapes in conf/model/*.yaml and the bandwidths/efficiencies
in conf/hardware/*.yaml; no torch module is built. The same `train_flops_per_token` feeds the
trainer's MFU log (training.build_model), the planner (stages/plan.py) and the dry run's time
estimate (stages/dryrun.py), so every MFU figure the kit prints uses one FLOPs count.

FLOPs convention: model FLOPs of one training step (forward + backward = 3x forward matmuls),
recomputation not counted (Korthikanti et al. 2022, "model FLOPs" as opposed to hardware FLOPs);
attention scores/values at the causal average context (seq/2), i.e. what a causal flash kernel
executes. MTP (one extra MoE layer + the shared LM head) is counted: the trainer runs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig


# ----------------------------------------------------------------------------------------
# Parameters per module kind (shapes as torchtitan's DeepSeek-V3 components build them).
# ----------------------------------------------------------------------------------------
def attention_params(m: DictConfig) -> int:
    """MLA projections + their RMSNorms (DeepSeek-V2 2.1): q down/up, kv down (+rope key), kv up, out."""
    qk_head = m.qk_nope_head_dim + m.qk_rope_head_dim
    if m.q_lora_rank:
        q = m.dim * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * m.n_heads * qk_head
    else:
        q = m.dim * m.n_heads * qk_head
    kv = m.dim * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
    kv += m.kv_lora_rank * m.n_heads * (m.qk_nope_head_dim + m.v_head_dim)
    return q + kv + m.n_heads * m.v_head_dim * m.dim


def expert_params(m: DictConfig) -> int:
    """One SwiGLU expert (gate, up, down)."""
    return 3 * m.dim * m.moe_hidden_dim


def moe_layer_params(m: DictConfig) -> dict:
    """Parameters of one MoE block: routed experts apart (they are the EP-sharded part)."""
    attn = attention_params(m) + 2 * m.dim  # + attention_norm, ffn_norm
    # + router gate, shared experts, post-MoE norm
    dense_part = attn + m.dim * m.num_experts + m.num_shared_experts * expert_params(m) + m.dim
    return {"dense": dense_part, "routed": m.num_experts * expert_params(m),
            "routed_active": m.top_k * expert_params(m)}


def dense_layer_params(m: DictConfig) -> int:
    return attention_params(m) + 2 * m.dim + 3 * m.dim * m.dense_hidden_dim


def param_counts(m: DictConfig) -> dict:
    """Total / active (per token) / MTP parameters, as model.count_params reports from a build."""
    moe = moe_layer_params(m)
    n_moe = m.n_layers - m.n_dense_layers
    emb = head = m.vocab_size * m.dim
    body = m.n_dense_layers * dense_layer_params(m) + n_moe * (moe["dense"] + moe["routed"])
    active_body = m.n_dense_layers * dense_layer_params(m) + n_moe * (moe["dense"] + moe["routed_active"])
    last_moe = n_moe > 0
    mtp_block = (moe["dense"] + moe["routed"]) if last_moe else dense_layer_params(m)
    mtp = m.num_mtp_layers * (3 * m.dim + 2 * m.dim * m.dim + mtp_block)  # enorm, hnorm, mtp_norm, eh_proj
    return {"total_params": emb + body + m.dim + head, "active_params": emb + active_body + m.dim + head,
            "mtp_params": mtp, "non_vocab_active": active_body + m.dim}


# ----------------------------------------------------------------------------------------
# FLOPs per token.
# ----------------------------------------------------------------------------------------
def attention_core_flops(m: DictConfig, seq_len: int) -> float:
    """Forward FLOPs per token of scores (QK^T) and values (AV) at the causal average context."""
    ctx = (seq_len + 1) / 2
    return 2 * ctx * m.n_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)


def forward_flops_per_token(m: DictConfig, seq_len: int) -> dict:
    """Forward FLOPs per token, by part (2 FLOPs per multiply-add of each active weight)."""
    moe = moe_layer_params(m)
    n_moe = m.n_layers - m.n_dense_layers
    attn = 2 * attention_params(m) + attention_core_flops(m, seq_len)
    parts = {
        "attention": m.n_layers * attn,
        "dense_mlp": m.n_dense_layers * 2 * 3 * m.dim * m.dense_hidden_dim,
        "moe": n_moe * 2 * (moe["dense"] - attention_params(m) + moe["routed_active"]),
        "head": 2 * m.dim * m.vocab_size,
        # MTP depth k: eh_proj + one MoE block + the shared LM head (DeepSeek-V3 2.2)
        "mtp": m.num_mtp_layers * (2 * 2 * m.dim * m.dim + attn + 2 * (moe["dense"] - attention_params(m)
                                   + moe["routed_active"]) + 2 * m.dim * m.vocab_size),
    }
    return parts


def recompute_share(m: DictConfig, seq_len: int, mode: str) -> float:
    """Forward FLOPs recomputed in backward, as a fraction of a layer's forward FLOPs.

    paper (3.5): the MLA up-projections (wq_b, wkv_b) and the MLP/MoE experts; full: the whole
    layer; selective (torchtitan's op-level SAC): every second matmul, about half; none: 0.
    """
    if mode in (None, "none"):
        return 0.0
    f = forward_flops_per_token(m, seq_len)
    layer = f["attention"] + f["dense_mlp"] + f["moe"]
    if mode == "full":
        return 1.0
    if mode == "selective":
        return 0.5
    if mode == "paper":
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        up = 2 * m.n_heads * ((m.q_lora_rank or m.dim) * qk + m.kv_lora_rank * (m.qk_nope_head_dim + m.v_head_dim))
        moe = moe_layer_params(m)
        n_moe = m.n_layers - m.n_dense_layers
        mlp = f["dense_mlp"] + n_moe * 2 * (m.num_shared_experts * expert_params(m) + moe["routed_active"])
        return (m.n_layers * up + mlp) / layer
    raise ValueError(f"parallelism.activation_checkpoint={mode}: expected none | selective | full | paper")


def train_flops_per_token(m: DictConfig, seq_len: int) -> float:
    """Model FLOPs of forward + backward per trained token (backward = 2x forward)."""
    return 3 * sum(forward_flops_per_token(m, seq_len).values())


# ----------------------------------------------------------------------------------------
# Time model: one optimizer step, per GPU.
# ----------------------------------------------------------------------------------------
@dataclass
class StepTime:
    compute_s: float
    ep_s: float
    pp_bubble_s: float
    pp_p2p_s: float
    dp_s: float
    cp_s: float
    flops_per_gpu: float
    peak_flops: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.ep_s + self.pp_bubble_s + self.pp_p2p_s + self.dp_s + self.cp_s

    @property
    def tflops_per_gpu(self) -> float:
        return self.flops_per_gpu / self.total_s / 1e12

    @property
    def mfu(self) -> float:
        return self.flops_per_gpu / self.total_s / self.peak_flops


def ep_bytes_per_token_layer(m: DictConfig, hw: DictConfig, ep: int) -> tuple[float, float]:
    """(intra-node, inter-node) bytes one token sends through one MoE layer's dispatch + combine,
    forward and backward (the backward moves the same volume back: dispatch <-> combine swap).

    Each token goes to top_k experts spread uniformly over the EP group; the share on the own GPU
    stays local. An EP group wider than a node sends the off-node share over the network; with
    DeepEP's internode kernels a token crosses to each remote node once and fans out over NVLink
    there (DeepSeek-V3 3.4.1), so the network carries one copy per distinct remote node.
    """
    d, k = m.dim, m.top_k
    per_copy = d * (hw.ep_dispatch_bytes + hw.ep_combine_bytes)  # forward; backward the same
    gpn = hw.procs_per_node  # ranks per node share the fast intra-node link
    nodes = max(1, math.ceil(ep / gpn))
    if nodes == 1:
        return 2 * per_copy * k * (ep - 1) / ep, 0.0
    remote_share = (nodes - 1) / nodes
    # expected distinct remote nodes hit by k uniform picks among `nodes` nodes
    distinct_remote = (nodes - 1) * (1 - (1 - 1 / nodes) ** k) if hw.ep_dedup_per_node else k * remote_share
    local_node_copies = k * (gpn - 1) / ep  # other GPUs of the own node
    fanout = k * remote_share if hw.ep_dedup_per_node else 0.0  # forwarded over NVLink on arrival
    return 2 * per_copy * (local_node_copies + fanout), 2 * per_copy * distinct_remote


def stage_fqns(m: DictConfig, p: DictConfig, seq_len: int) -> list[list[str]]:
    """Module names of each pipeline (virtual) stage: the trainer's own split (pipeline.stage_split,
    balanced by FLOPs and parameters; the LM head + MTP, ~5.6 MoE layers of FLOPs, sit on the last
    stage)."""
    n_stages = p.pp * (p.get("pp_stages_per_rank", 1) or 1)
    if n_stages == 1:
        return [["tok_embeddings"] + [f"layers.{i}" for i in range(m.n_layers)] + ["norm", "lm_head"]]
    from kit import (
        pipeline,  # the trainer's split (pipeline imports model; keep perf_model import-light)
    )

    return pipeline.stage_split(m, n_stages, seq_len)


def module_forward_flops(m: DictConfig, seq_len: int, fqn: str) -> tuple[float, int]:
    """(forward FLOPs per token, MoE layers) of one top-level module name of a stage."""
    f = forward_flops_per_token(m, seq_len)
    attn = f["attention"] / m.n_layers
    if fqn.startswith("layers."):
        i = int(fqn.split(".")[1])
        if i < m.n_dense_layers:
            return attn + f["dense_mlp"] / max(1, m.n_dense_layers), 0
        return attn + f["moe"] / (m.n_layers - m.n_dense_layers), 1
    if fqn == "lm_head":  # the MTP layers run where the head is (they share it)
        return f["head"] + f["mtp"], m.num_mtp_layers
    return 0.0, 0  # embeddings, norms: no matmul FLOPs


def step_time(m: DictConfig, hw: DictConfig, p: DictConfig, *, seq_len: int, global_batch: int,
              world: int, stages: list[list[str]] | None = None) -> StepTime:
    """Seconds of one optimizer step on the slowest pipeline rank, split by cause.

    compute: the rank's model FLOPs plus the recomputed forward of the configured recomputation,
    at hardware.gemm_efficiency of the dense BF16 peak; EP: dispatch/combine volumes at the NVLink /
    network bandwidths, not overlapped (DeepEP's normal kernels run between the GEMMs); PP: the
    schedule's bubble, (pp-1)/(v*m) of the busy time (1F1B: v=1; interleaved: v stages per rank),
    plus the activation sends between stages; DP: one FSDP all-gather (bf16) and one reduce-scatter
    (fp32) of the stage's parameters per step (torchtitan keeps them unsharded across micro-batches
    under PP); CP: all-gather of the compressed KV latent and reduce-scatter of its gradient per
    layer (context_parallel.py gathers the latent, not per-head K/V).
    """
    pp, ep, cp = p.pp, p.ep, p.cp
    dp = world // (pp * cp * p.tp)
    tokens_mb = p.micro_batch * seq_len // cp           # tokens one GPU computes per micro-batch
    n_micro = global_batch // (dp * p.micro_batch)      # micro-batches per pipeline per step
    v = (p.get("pp_stages_per_rank", 1) or 1) if pp > 1 else 1
    stages = stages or stage_fqns(m, p, seq_len)
    per_stage = [[module_forward_flops(m, seq_len, f) for f in s] for s in stages]
    # rank r holds virtual stages r, r+pp, ... (torchtitan's looped schedules)
    ranks = [[per_stage[s] for s in range(r, len(stages), pp)] for r in range(pp)]
    fwd = [sum(f for st in rk for f, _ in st) for rk in ranks]
    moe = [sum(n for st in rk for _, n in st) for rk in ranks]
    recompute = recompute_share(m, seq_len, p.get("activation_checkpoint", "none"))
    peak = hw.peak_tflops * 1e12
    intra, inter = ep_bytes_per_token_layer(m, hw, ep) if ep > 1 else (0.0, 0.0)
    ep_per_layer = tokens_mb * (intra / (hw.nvlink_gbps * 1e9) + inter / (hw.inter_node_gbps * 1e9))
    compute = [f * tokens_mb * (3 + recompute) / (peak * hw.gemm_efficiency) for f in fwd]
    slow = max(range(pp), key=lambda r: compute[r] + moe[r] * ep_per_layer)  # the pipeline's pace
    t_mb_compute, t_mb_ep = compute[slow], moe[slow] * ep_per_layer

    busy = n_micro * (t_mb_compute + t_mb_ep)
    bubble = (pp - 1) / (v * n_micro) * busy if pp > 1 else 0.0
    act_bytes = tokens_mb * m.dim * 2 * 2  # bf16 activation forward + its gradient backward
    p2p = n_micro * v * act_bytes / (hw.inter_node_gbps * 1e9) if pp > 1 else 0.0

    moe_p = moe_layer_params(m)
    rank_params = moe[slow] * (moe_p["dense"] + moe_p["routed"] / ep)  # the MoE layers dominate
    dp_s = rank_params * (2 + 4) * (dp - 1) / dp / (hw.inter_node_gbps * 1e9) if dp > 1 else 0.0
    # The kit's CP all-gathers MLA's compressed latent (context_parallel.py), not per-head K/V
    latent_per_token = (m.kv_lora_rank + m.qk_rope_head_dim) * 2  # bf16
    layers_slow = sum(1 for s in range(slow, len(stages), pp) for f in stages[s] if f.startswith("layers."))
    cp_bytes = 2 * n_micro * layers_slow * seq_len * (cp - 1) / cp * latent_per_token if cp > 1 else 0.0
    cp_s = cp_bytes / (hw.inter_node_gbps * 1e9) if cp > 1 else 0.0

    flops_gpu = train_flops_per_token(m, seq_len) * global_batch * seq_len / world
    return StepTime(compute_s=n_micro * t_mb_compute, ep_s=n_micro * t_mb_ep, pp_bubble_s=bubble,
                    pp_p2p_s=p2p, dp_s=dp_s, cp_s=cp_s, flops_per_gpu=flops_gpu, peak_flops=peak)
