"""Activation memory of A.X K1 from its shapes, and a meter that measures it on a real model.

The formula follows Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", arXiv 2205.05198, section 4.1): walk one transformer layer operator by
operator and add up every tensor that autograd keeps for the backward pass, in bytes per token.
Their GPT layer gives 34 s b h + 5 a s^2 b; A.X K1's layer is MLA + MoE, so the walk is redone
here for its tensors (MLA latents, q/k/v, grouped expert GEMMs, router) and for the kernels the
kit runs. The paper cites the same work for its recomputation (A.X K1 report 3.5).

Two kernels differ between the CPU and GPU builds and change which tensors are kept:
  * RMSNorm: CUDA's fused `_fused_rms_norm` keeps its input and the fp32 1/rms; the CPU build
    decomposes it and also keeps x * (1/rms) (one more hidden-sized tensor per norm);
  * attention: flex attention (GPU) keeps q, k, v, out and the fp32 log-sum-exp, with v and out
    v_head_dim wide and v a view of the kv up-projection output (so that whole tensor stays);
    the CPU kernel (kernels.DocumentSDPA) pads v to the qk width, so v and out are qk-wide.
`device="cpu"` picks the CPU walk (what the tests measure), anything else the GPU one.

Recompute modes (parallelism.activation_checkpoint): `none`; `paper` (A.X K1 3.5: recompute
the MLA up-projections and the MLP/MoE blocks, keep the rest; memory_features.PaperAC); `full`
(torchtitan's FullAC: each main layer keeps only its input; torchtitan does not wrap MTP layers).
torchtitan's `selective` is an op-level policy (every other matmul) with no closed form here.

`SavedActivationBytes` measures the same quantity on a real forward pass: the bytes of every
tensor storage created inside the `with` block that is still alive at the end, i.e. what the
autograd graph (saved tensors, checkpoint inputs, selective-recompute caches) keeps.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

FP32, INT64, COMPLEX64 = 4, 8, 8  # bytes of the tensors kept in fixed precision


# ----------------------------------------------------------------------------------------
# The formula: bytes per token of each kept tensor, then x tokens.
# ----------------------------------------------------------------------------------------
def _norm(width: int, p: int, cpu: bool, keep_output: bool) -> int:
    """An RMSNorm over `width`: its input (p), 1/rms (fp32), x/rms on CPU, and its output when
    the next op keeps it (a linear layer does; a residual add does not)."""
    return width * p + FP32 + (width * p if cpu else 0) + (width * p if keep_output else 0)


def _attention(m, p: int, recompute: str, cpu: bool) -> int:
    """Attention sub-layer per token, from the layer input x to the residual add."""
    H, dqk, dv = m.n_heads, m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
    D, q_lat, kv_lat, dr = m.dim, m.q_lora_rank, m.kv_lora_rank, m.qk_rope_head_dim
    v_w = dqk if cpu else dv
    out_kernel = H * v_w * p + H * FP32        # kernel output + log-sum-exp
    keep = _norm(D, p, cpu, keep_output=True)  # x, 1/rms, (x/rms), normed x: input of wq_a, wkv_a
    keep += q_lat * p + (kv_lat + dr) * p      # latents c_q and [c_kv, k_pe] (down-projections)
    keep += out_kernel
    if recompute == "paper":
        return keep  # up-projections, their norms, RoPE and concat are recomputed from the latents
    keep += _norm(q_lat, p, cpu, keep_output=True) - q_lat * p  # q_norm (its input is c_q)
    keep += _norm(kv_lat, p, cpu, keep_output=True) - kv_lat * p  # kv_norm (input: a view of [c_kv, k_pe])
    keep += (dr // 2) * COMPLEX64              # RoPE rotations gathered at the positions
    keep += 2 * H * dqk * p                    # q, k after RoPE and concat
    keep += H * dqk * p if cpu else H * (m.qk_nope_head_dim + dv) * p  # v (padded / kv_b output)
    keep += H * dv * p                         # attention output made contiguous: wo's input
    return keep


def _router(m) -> int:
    """Sigmoid group-limited top-k router per token (fp32 scores, int64 ids)."""
    # sigmoid scores; chosen expert ids and their scores; the score normaliser
    return m.num_experts * FP32 + m.top_k * (INT64 + FP32) + FP32


def _ffn(m, p: int, recompute: str, cpu: bool, moe: bool) -> int:
    """MLP or MoE sub-layer per token, from the residual input to the residual add."""
    D = m.dim
    keep = _norm(D, p, cpu, keep_output=True)  # h, 1/rms, (h/rms), normed h: the block's input
    if moe:
        keep += _norm(D, p, cpu, keep_output=False)  # post-MoE norm (dual norm), input = MoE output
    if recompute == "paper":
        if moe:  # routing decisions are kept so the recomputed block routes identically
            topk = 2 * m.n_group + m.topk_group + m.top_k
            keep += topk * (INT64 + FP32)
        return keep
    if not moe:
        return keep + 4 * m.dense_hidden_dim * p  # gate, silu(gate), up, product
    K, F, Fs = m.top_k, m.moe_hidden_dim, m.moe_hidden_dim * m.num_shared_experts
    keep += _router(m)
    keep += K * (INT64 + FP32 + INT64)         # sort order, permuted scores, token index
    keep += K * D * p                          # tokens gathered per expert
    keep += K * 4 * F * p                      # grouped GEMMs: gate, silu, up, product
    keep += K * D * p                          # expert outputs (scaled by the routing scores)
    keep += 4 * Fs * p                         # shared expert: gate, silu, up, product
    keep += FP32                               # sequence-wise balance loss: sum of scores
    return keep


def activation_bytes_per_layer(model_cfg, seq_len: int, micro_batch: int, recompute_mode: str,
                               dtype_bytes: int, *, moe: bool = True, device: str = "cuda") -> int:
    """Bytes one transformer layer keeps for backward for one micro-batch of sequences.

    `dtype_bytes` is the activation dtype (2 for bf16 compute, 4 for fp32); router scores, norm
    statistics and the attention log-sum-exp are fp32 whatever it is. `moe=False` is a dense
    layer (A.X K1's layer 0).
    """
    tokens = seq_len * micro_batch
    cpu = device == "cpu"
    if recompute_mode == "full":
        return tokens * model_cfg.dim * dtype_bytes  # only the layer input
    if recompute_mode not in ("none", "paper"):
        raise ValueError(f"activation_bytes_per_layer: recompute_mode {recompute_mode!r} has no formula "
                         f"(expected none|paper|full)")
    per_token = _attention(model_cfg, dtype_bytes, recompute_mode, cpu)
    per_token += _ffn(model_cfg, dtype_bytes, recompute_mode, cpu, moe)
    return tokens * per_token


def head_bytes(model_cfg, seq_len: int, micro_batch: int, ce_chunk_tokens: int, dtype_bytes: int,
               device: str = "cuda") -> int:
    """Final norm + LM head + cross-entropy for one micro-batch. The plain head keeps the fp32
    log-probabilities [tokens x vocab]; the chunked one (memory.chunked_ce) keeps only its input
    and labels and recomputes each chunk's logits in backward."""
    tokens, cpu = seq_len * micro_batch, device == "cpu"
    per_token = _norm(model_cfg.dim, dtype_bytes, cpu, keep_output=True) + INT64  # + labels
    if ce_chunk_tokens <= 0:
        per_token += model_cfg.vocab_size * FP32
    return tokens * per_token


def mtp_bytes(model_cfg, seq_len: int, micro_batch: int, recompute_mode: str, ce_chunk_tokens: int,
              dtype_bytes: int, device: str = "cuda") -> int:
    """One MTP depth: embedding of the shifted tokens, enorm/hnorm, eh_proj, an MoE layer,
    mtp_norm and its head (the shared lm_head)."""
    tokens, cpu, p, D = seq_len * micro_batch, device == "cpu", dtype_bytes, model_cfg.dim
    layer_mode = "none" if recompute_mode == "full" else recompute_mode  # torchtitan skips MTP layers
    per_token = 2 * _norm(D, p, cpu, keep_output=False)  # enorm(embedding), hnorm(masked hidden)
    per_token += p                                       # the valid-token mask as a multiplier
    per_token += 2 * D * p                               # concat: eh_proj's input
    per_token += _norm(D, p, cpu, keep_output=False)     # mtp_norm (its output is the head input)
    block = activation_bytes_per_layer(model_cfg, seq_len, micro_batch, layer_mode, p, moe=True, device=device)
    head = head_bytes(model_cfg, seq_len, micro_batch, ce_chunk_tokens, p, device)
    # mtp_norm's output is the head input: head_bytes counts a whole norm, keep only its output
    head -= tokens * (_norm(D, p, cpu, keep_output=True) - D * p)
    return tokens * per_token + block + head


def activation_bytes_model(model_cfg, seq_len: int, micro_batch: int, recompute_mode: str,
                           ce_chunk_tokens: int, dtype_bytes: int, device: str = "cuda",
                           n_layers: int | None = None, with_head: bool = True) -> int:
    """All layers (or the first `n_layers`, e.g. one pipeline stage's share), the MTP depths
    and the heads, for one micro-batch."""
    n = model_cfg.n_layers if n_layers is None else n_layers
    n_dense = min(n, model_cfg.n_dense_layers)
    total = sum(activation_bytes_per_layer(model_cfg, seq_len, micro_batch, recompute_mode, dtype_bytes,
                                           moe=i >= n_dense, device=device) for i in range(n))
    if with_head:
        total += head_bytes(model_cfg, seq_len, micro_batch, ce_chunk_tokens, dtype_bytes, device)
        total += model_cfg.num_mtp_layers * mtp_bytes(model_cfg, seq_len, micro_batch, recompute_mode,
                                                      ce_chunk_tokens, dtype_bytes, device)
    return total


# ----------------------------------------------------------------------------------------
# The meter: storages created inside the block and still alive at its end.
# ----------------------------------------------------------------------------------------
class SavedActivationBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages that ops inside the `with` block allocate and that
    are still referenced when asked (`.alive()`), e.g. right after the loss is computed: what
    the autograd graph keeps for backward. Views and in-place results share an input's storage
    and are not new; parameters and buffers exist before the block and are never counted.
    `.peak` is the largest alive total seen after any op (set track_peak=True; it scans every
    live storage per op, so keep it to small regions such as a loss head)."""

    def __init__(self, track_peak: bool = False):
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self.track_peak, self.peak = track_peak, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            known = self.storages.get(key)
            if key not in inputs and (known is None or known[0].expired()):  # (a freed id can be reused)
                self.storages[key] = (StorageWeakRef(storage), storage.nbytes())
        if self.track_peak:
            self.peak = max(self.peak, self.alive())
        return out

    def alive(self) -> int:
        dead = [k for k, (ref, _) in self.storages.items() if ref.expired()]
        for k in dead:
            del self.storages[k]
        return sum(n for _, n in self.storages.values())
