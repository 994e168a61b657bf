"""Context parallel (CP) for MLA: the 16K/32K stages split every sequence over CP ranks (paper 3.4:
CP 4 at 16K, CP 8 at 32K).

What a CP rank holds. A packed row of L tokens is cut into 2*cp equal chunks; rank r keeps chunk r
and chunk 2*cp-1-r (head-tail load balancing: under a causal mask early chunks see few keys and
late chunks many, so pairing them gives every rank the same attention work). Positions (for RoPE)
and document ids are those of the full row, so a document that crosses a chunk border is still one
document. Labels, MTP's rolled labels and MTP's shifted input tokens are computed on the full row
before the cut, so nothing is lost at chunk borders. Embeddings, norms, MoE/MLP and the heads run
on the rank's local tokens only.

What crosses the wire. torchtitan's CP all-gathers per-head K and V (n_heads x (qk_head + v_head)
values per token). MLA's keys and values are an up-projection (wkv_b) of a compressed latent: the
normalised kv_lora vector plus the shared RoPE key, kv_lora_rank + qk_rope_head_dim values per token
(512 + 64 at 519B against 64 x (192 + 128): ~35x less). So each attention layer all-gathers the
latent (`all_gather_single_autograd`, whose backward reduce-scatters the latent's gradient), every
rank up-projects the whole gathered latent and attends its local queries to the keys it may see:
causal and same-document, decided from global token indices and global document ids (a dense mask
for SDPA on CPU, a flex BlockMask on GPU).

torchtitan's own CP hook (`apply_cp_to_forward`) would all-gather K/V for flex and refuses our SDPA
kernel, so `parallelize` hands torchtitan's parallelize a view of ParallelDims without CP; FSDP
still shards over dp_shard x cp (torchtitan's `fsdp` mesh) and the loss reduces over its `loss`
mesh (dp x cp).

`TRAFFIC` counts the bytes each rank's all-gather sends (forward) and its reduce-scatter sends
(backward); bench/cp_traffic.py reads it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_gather_single_autograd
from torch.nn.attention.flex_attention import BlockMask
from torchtitan.distributed import ParallelDims
from torchtitan.models.common.attention import FlexAttention, create_attention_mask
from torchtitan.models.deepseek_v3 import parallelize_deepseekv3
from torchtitan.models.deepseek_v3.model import Attention
from torchtitan.models.deepseek_v3.mtp import roll_mtp_sequence

import kernels

TRAFFIC = {"allgather_bytes": 0, "reduce_scatter_bytes": 0, "calls": 0}


def reset_traffic() -> None:
    TRAFFIC.update(allgather_bytes=0, reduce_scatter_bytes=0, calls=0)


# ----------------------------------------------------------------------------------------
# Sharding a batch: head-tail chunks, global positions/document ids, labels from the full row.
# ----------------------------------------------------------------------------------------
def headtail_index(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """Global token indices held by `rank`: chunk `rank` and chunk `2*cp-1-rank` of 2*cp chunks."""
    if seq_len % (2 * cp):
        raise ValueError(f"context parallel: seq_len={seq_len} is not a multiple of 2*cp={2 * cp}")
    c = seq_len // (2 * cp)
    head, tail = rank * c, (2 * cp - 1 - rank) * c
    return torch.cat([torch.arange(head, head + c), torch.arange(tail, tail + c)])


def document_ids(positions: torch.Tensor) -> torch.Tensor:
    """(B, L) document index of each token; a document starts where its position is 0 (the
    reset-style positions of the packed loader, the convention torchtitan's masks use)."""
    return torch.cumsum(positions == 0, dim=1)


@dataclass
class CPMasks:
    """One micro-batch's attention inputs under CP, passed where the model takes
    `attention_masks` (every attention layer, main and MTP, receives it)."""
    kernel: torch.Tensor | BlockMask  # what the inner attention takes: dense (B,1,Lq,L) or a BlockMask
    kv_order: torch.Tensor            # (L,): gathered (rank-major) latent -> global token order
    mtp_inputs: list                  # per MTP depth: (shifted tokens (B,Lq), valid mask (B,Lq)), local


class ContextParallel:
    """Shards batches for one CP group and builds the per-micro-batch CPMasks."""

    def __init__(self, group, *, flex: bool, flex_block_size=None):
        self.group, self.size, self.rank = group, dist.get_world_size(group), dist.get_rank(group)
        self.flex, self.flex_block_size = flex, flex_block_size

    def shard(self, batch: dict, targets: list[torch.Tensor], num_mtp: int) -> tuple[dict, list[torch.Tensor]]:
        """Full rows -> this rank's tokens. `targets` (main head + MTP depths) were built on the
        full rows; MTP's shifted inputs are built here, on the full rows, before the cut."""
        tokens, positions = batch["input_ids"], batch["positions"]
        idx = headtail_index(tokens.shape[1], self.size, self.rank)
        local = {"input_ids": tokens[:, idx], "positions": positions[:, idx], "q_index": idx,
                 "doc_ids": document_ids(positions), "mtp_inputs": []}
        for depth in range(1, num_mtp + 1):
            shifted, valid = roll_mtp_sequence(tokens, shift=depth, fill_value=0, positions=positions,
                                               return_valid_mask=True)
            local["mtp_inputs"].append((shifted[:, idx], valid[:, idx]))
        return local, [t[:, idx] for t in targets]

    def masks(self, local: dict, rows: slice, device: torch.device) -> CPMasks:
        mtp = [(t[rows].to(device), v[rows].to(device)) for t, v in local["mtp_inputs"]]
        return build_masks(local["q_index"].to(device), local["doc_ids"][rows].to(device), mtp,
                           flex=self.flex, block_size=self.flex_block_size)


def build_masks(q_index: torch.Tensor, doc: torch.Tensor, mtp_inputs: list, *, flex: bool, block_size) -> CPMasks:
    L = doc.shape[1]
    cp = L // q_index.numel()
    gathered = torch.cat([headtail_index(L, cp, r) for r in range(cp)])  # the all-gather's token order
    kv_order = torch.argsort(gathered).to(doc.device)
    if flex:
        kernel = flex_block_mask(q_index, doc, block_size)
    else:
        kernel = kernels.additive_mask(dense_mask(q_index, doc))  # as get_attention_masks: once per forward
    return CPMasks(kernel=kernel, kv_order=kv_order, mtp_inputs=mtp_inputs)


# Pipeline stages build their masks per micro-batch from tensors the schedule hands them (it splits
# tensor kwargs along the rows), so under PP x CP the CP inputs travel as row-major kwargs.
def stage_inputs(local: dict, device: torch.device) -> dict:
    """A CP-sharded batch's extra kwargs for pipeline stages ({} for an unsharded batch)."""
    if "doc_ids" not in local:
        return {}
    B = local["doc_ids"].shape[0]
    out = {"cp_doc_ids": local["doc_ids"], "cp_q_index": local["q_index"].expand(B, -1).contiguous()}
    if local["mtp_inputs"]:
        out["cp_mtp_tokens"] = torch.stack([t for t, _ in local["mtp_inputs"]], dim=1)
        out["cp_mtp_valid"] = torch.stack([v for _, v in local["mtp_inputs"]], dim=1)
    return {k: v.to(device) for k, v in out.items()}


def stage_masks(model: torch.nn.Module, cp_doc_ids, cp_q_index, cp_mtp_tokens=None, cp_mtp_valid=None) -> CPMasks:
    """CPMasks for one micro-batch on a pipeline stage, from `stage_inputs`' tensors."""
    inner = model.config.first_attention.inner_attention
    flex = isinstance(inner, FlexAttention.Config)
    mtp = [] if cp_mtp_tokens is None else list(zip(cp_mtp_tokens.unbind(1), cp_mtp_valid.unbind(1)))
    return build_masks(cp_q_index[0], cp_doc_ids, mtp, flex=flex, block_size=inner.block_size if flex else None)


def dense_mask(q_index: torch.Tensor, doc: torch.Tensor) -> torch.Tensor:
    """(B, 1, Lq, L) bool: local query i (global index q_index[i]) sees global key j iff
    j <= q_index[i] and both are in the same document."""
    L = doc.shape[1]
    causal = torch.arange(L, device=doc.device).unsqueeze(0) <= q_index.unsqueeze(1)  # (Lq, L)
    same_doc = doc[:, q_index].unsqueeze(2) == doc.unsqueeze(1)  # (B, Lq, L)
    return (same_doc & causal).unsqueeze(1)


def cp_mask_mod(q_index: torch.Tensor, doc: torch.Tensor):
    """flex mask_mod of `dense_mask`: q_idx is a local query, kv_idx a global key."""
    def mask_mod(b, h, q_idx, kv_idx):
        g = q_index[q_idx]
        return (kv_idx <= g) & (doc[b, g] == doc[b, kv_idx])
    return mask_mod


def flex_block_mask(q_index: torch.Tensor, doc: torch.Tensor, block_size) -> BlockMask:
    """The same mask as `dense_mask`, as a flex BlockMask over (local queries, global keys),
    built by torchtitan's compiled create_block_mask."""
    kw = {} if block_size is None else {"BLOCK_SIZE": block_size}
    return create_attention_mask(cp_mask_mod(q_index, doc), doc.shape[0], None, q_index.shape[0], doc.shape[1],
                                 device=doc.device, **kw)


# ----------------------------------------------------------------------------------------
# The latent all-gather.
# ----------------------------------------------------------------------------------------
def gather_latent(latent: torch.Tensor, group, kv_order: torch.Tensor) -> torch.Tensor:
    """(B, Lq, C) local latent -> (B, L, C) of the whole row, in global token order. Backward
    reduce-scatters the gradient (summed over the ranks whose queries used each key)."""
    size = dist.get_world_size(group)
    elt = latent.element_size()
    TRAFFIC["calls"] += 1
    TRAFFIC["allgather_bytes"] += latent.numel() * elt * (size - 1)  # each rank sends its shard to size-1 peers
    # all_gather_single_autograd (the current name of all_gather_tensor_autograd) gathers along dim 0.
    full = all_gather_single_autograd(latent.transpose(0, 1).contiguous(), 0, group)
    full = full.transpose(0, 1).index_select(1, kv_order)
    if full.requires_grad:
        def count(grad):  # reduce-scatter: each rank sends size-1 of its size gradient slices
            TRAFFIC["reduce_scatter_bytes"] += grad.numel() * grad.element_size() * (size - 1) // size
        full.register_hook(count)
    return full


def sum_over_sequence_ranks(x: torch.Tensor, group) -> torch.Tensor:
    """Value: x summed over the CP group; gradient: to the local x only. For per-sequence sums
    (the sequence-wise aux loss) whose summands live on different CP ranks: each rank backpropagates
    into its own tokens, and FSDP's gradient sum over the cp ranks adds the parts up."""
    total = x.detach().clone()
    dist.all_reduce(total, group=group)
    return x + (total - x.detach())


# ----------------------------------------------------------------------------------------
# MLA under CP.
# ----------------------------------------------------------------------------------------
class MLA(Attention):
    """torchtitan's DeepSeek-V3 MLA. Without CP it is the parent unchanged; with a CP group
    (set by `apply`) it gathers the compressed latent instead of K/V and attends local queries."""

    @dataclass(kw_only=True, slots=True)
    class Config(Attention.Config):
        pass

    def __init__(self, config: Config):
        super().__init__(config)
        self.cp_group = None

    def forward(self, x, attention_masks, positions=None):
        if self.cp_group is None:
            return super().forward(x, attention_masks, positions)
        if not isinstance(attention_masks, CPMasks):
            raise TypeError("context-parallel MLA needs CPMasks (ContextParallel.masks) as attention_masks")
        B, Lq, _ = x.shape
        dn, dr, dv = self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        # Queries: local tokens only, as in the parent.
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q_nope, q_pe = torch.split(q.view(B, Lq, -1, dn + dr), [dn, dr], dim=-1)
        kv, k_pe = torch.split(self.wkv_a(x), [self.kv_lora_rank, dr], dim=-1)
        q_pe, k_pe = self.rope(q_pe, k_pe.unsqueeze(2), positions)  # global positions
        q = torch.cat([q_nope, q_pe], dim=-1)
        # The latent (normalised kv_lora + RoPE'd shared key) is what crosses the wire.
        latent = gather_latent(torch.cat([self.kv_norm(kv), k_pe.squeeze(2)], dim=-1),
                               self.cp_group, attention_masks.kv_order)
        kv, k_pe = torch.split(latent, [self.kv_lora_rank, dr], dim=-1)
        L = kv.shape[1]
        k_nope, v = torch.split(self.wkv_b(kv).view(B, L, -1, dn + dv), [dn, dv], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, k_nope.size(2), -1)], dim=-1)
        out = self.inner_attention(q, k, v, attention_masks=attention_masks.kernel, scale=self.softmax_scale)
        return self.wo(out.contiguous().view(B, Lq, -1))


# ----------------------------------------------------------------------------------------
# Parallelize: the kit's CP, then torchtitan's DeepSeek-V3 parallelize for the rest.
# ----------------------------------------------------------------------------------------
class _ParallelDimsWithoutTorchtitanCP(ParallelDims):
    """ParallelDims as torchtitan's parallelize_deepseekv3 should see it when the kit runs CP: its
    only use of `cp_enabled` on our (legacy SPMD) path is to install apply_cp_to_forward, which
    all-gathers K/V (flex) or rejects our SDPA kernel. Meshes (fsdp = dp_shard x cp) are the real
    ones. tests/test_context_parallel.py fails when torchtitan stops calling that hook."""

    @property
    def cp_enabled(self):
        return False


def apply(model: torch.nn.Module, group) -> None:
    """Give every MLA and every MoE (its sequence-wise aux loss) the CP process group."""
    for mod in model.modules():
        if hasattr(mod, "cp_group"):
            mod.cp_group = group


def parallelize(model: torch.nn.Module, *, parallel_dims: ParallelDims, **kwargs):
    if parallel_dims.cp_enabled:
        apply(model, parallel_dims.get_mesh("cp").get_group())
        parallel_dims = copy.copy(parallel_dims)
        parallel_dims.__class__ = _ParallelDimsWithoutTorchtitanCP
    return parallelize_deepseekv3(model, parallel_dims=parallel_dims, **kwargs)


def build(model: torch.nn.Module, parallel_dims: ParallelDims) -> ContextParallel | None:
    """The loop's CP handle (None without CP); the mask kind follows the model's attention kernel."""
    if not parallel_dims.cp_enabled:
        return None
    inner = model.config.first_attention.inner_attention
    flex = isinstance(inner, FlexAttention.Config)
    return ContextParallel(parallel_dims.get_mesh("cp").get_group(), flex=flex,
                           flex_block_size=inner.block_size if flex else None)

