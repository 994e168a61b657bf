"""GPU figures of one H200 (issue 17, `make gpu-check`): kernels, and one A.X K1 block at full width.

    python bench/gpu_step.py                      # on a GPU: parts a, b, d; one JSON line at the end
    python bench/gpu_step.py --device cpu --tiny  # the same code on the tiny shapes (make test runs it)

(a) attention: flex attention vs SDPA under the packed-document causal mask, forward + backward in
    bf16 (time and largest difference), and the context-parallel flex BlockMask against the dense
    CP mask (kit/context_parallel.py) on the same local queries.
(b) the routed experts' grouped GEMM (torch._grouped_mm) in bf16 against an fp32 reference.
(d) one MoE block at the width of conf/model/axk1_519b.yaml: MLA attention, the routed experts one
    EP rank holds (num_experts / parallelism ep of conf/parallelism/axk1_pretrain.yaml), top-k routing
    over them, the shared expert; seq_len and micro_batch of the paper's stage 1. Timed with CUDA
    events after warm-up: tokens/s, TFLOP/s (cost_model's FLOPs of the block), MFU against the
    datasheet peak and the measured bf16 ceiling (conf/hardware/h200_node.yaml), peak memory beside
    activation_memory's prediction; bf16 vs FP8 (torchao tensorwise; experts stay bf16, as in the
    kit) and recompute none vs `paper`. Two builds: `ceiling`, the same shapes in plain torch +
    torchao (runs on torch >= 2.11), and `kit`, model.py's block (needs the torch names the kit
    uses; where they are missing it says which).
Part (c), the kit's pre-training stage killed and resumed, is scripts/gpu_check.sh's.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.checkpoint import checkpoint

from kit import activation_memory, cost_model

ROOT = Path(__file__).resolve().parents[1]
# torch names the kit and torchtitan's deepseek_v3 use that older torch builds lack (issue 17
# measured torch 2.11): (module, attribute, keyword argument of it or None)
KIT_TORCH_NAMES = [
    ("torch.distributed._functional_collectives", "all_gather_single_autograd", None),
    ("torch.distributed.fsdp", "DataParallelMeshDims", None),
    ("torch.distributed.fsdp", "fully_shard", "dp_mesh_dims"),
    ("torch.distributed.pipelining", "PipelineStage", "get_mesh"),
    ("torch.nn.attention.flex_attention", "create_block_mask", "separate_full_blocks"),
    ("torch.compiler", "_is_non_strict_tracing", None),
]


def missing_kit_torch_names() -> list[str]:
    missing = []
    for module, name, kwarg in KIT_TORCH_NAMES:
        obj = getattr(importlib.import_module(module), name, None)
        if obj is None:
            missing.append(f"{module}.{name}")
        elif kwarg and kwarg not in inspect.signature(obj).parameters:
            missing.append(f"{module}.{name}({kwarg}=)")
    return missing


# ----------------------------------------------------------------------------------------
# Shapes and hardware figures, all from conf/.
# ----------------------------------------------------------------------------------------
def proxy_setup(tiny: bool, device: str) -> tuple:
    """(model config of the one-block proxy, seq_len, micro_batch, ep, hardware config)."""
    conf = ROOT / "conf"
    m = OmegaConf.load(conf / "model" / ("tiny.yaml" if tiny else "axk1_519b.yaml"))
    layout = OmegaConf.load(conf / "parallelism" / ("cpu_fsdp_ep.yaml" if tiny else "axk1_pretrain.yaml"))
    base = OmegaConf.load(conf / "parallelism" / "none.yaml")
    ep, micro = layout.get("ep", base.ep), layout.get("micro_batch", base.micro_batch)
    seq = OmegaConf.load(conf / "stage" / "pretrain_s1.yaml").budget[m.budget].seq_len
    hw = OmegaConf.load(conf / "hardware" / ("cpu.yaml" if device == "cpu" else "h200_node.yaml"))
    # one block, the experts of one EP rank, top-k over them (no group limit inside a rank), no MTP
    proxy = OmegaConf.merge(m, {"n_layers": 1, "n_dense_layers": 0, "num_experts": m.num_experts // ep,
                                "n_group": 1, "topk_group": 1, "num_mtp_layers": 0})
    return proxy, seq, micro, ep, hw


def block_flops_per_token(m, seq: int) -> float:
    """Training FLOPs (3 x forward) of the block alone: attention + MoE, no embedding or head."""
    f = cost_model.forward_flops_per_token(m, seq)
    return 3 * (f["attention"] + f["moe"])


def packed_positions(rows: int, seq: int, doc_len: int) -> torch.Tensor:
    """Reset-style positions of rows packed with documents of doc_len tokens (the last one cut)."""
    return (torch.arange(seq) % doc_len).repeat(rows, 1)


def timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call after warm-up: CUDA events on a GPU, the wall clock elsewhere."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


# ----------------------------------------------------------------------------------------
# (a) attention kernels under the document mask.
# ----------------------------------------------------------------------------------------
def attention_figures(m, seq: int, micro: int, device: torch.device, args) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    qk, dv, heads = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim, m.n_heads
    pos = packed_positions(micro, seq, args.doc_len).to(device)
    doc = torch.cumsum(pos == 0, dim=1)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril_()
    dense = (doc[:, :, None] == doc[:, None, :]) & causal
    g = torch.Generator(device=device).manual_seed(0)
    q, k = (torch.randn(micro, heads, seq, qk, device=device, generator=g, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(micro, heads, seq, dv, device=device, generator=g, dtype=torch.bfloat16)
    scale = qk ** -0.5

    def sdpa(q, k, v):
        # fused SDPA kernels want one head dim: v zero-padded to the qk width (as kernels.DocumentSDPA)
        out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, qk - dv)), attn_mask=dense[:, None], scale=scale)
        return out[..., :dv]

    def run(kernel):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = kernel(*leaves)
        out.float().square().mean().backward()
        return out, [t.grad for t in leaves]

    figures = {"sdpa_ms": 1e3 * timed(lambda: run(sdpa), device, args.warmup, args.iters)}
    if device.type != "cuda":
        return {**figures, "flex": "needs CUDA (flex attention has no CPU backward)"}
    mask_mod = lambda b, h, qi, ki: (doc[b, qi] == doc[b, ki]) & (ki <= qi)  # noqa: E731
    block_mask = create_block_mask(mask_mod, micro, None, seq, seq, device=device)
    flex = torch.compile(flex_attention)
    figures["flex_ms"] = 1e3 * timed(lambda: run(lambda q, k, v: flex(q, k, v, block_mask=block_mask, scale=scale)),
                                     device, args.warmup, args.iters)
    (o_ref, g_ref), (o_flex, g_flex) = run(sdpa), run(lambda q, k, v: flex(q, k, v, block_mask=block_mask, scale=scale))
    figures["flex_vs_sdpa_max_abs_out"] = float((o_ref.float() - o_flex.float()).abs().max())
    figures["flex_vs_sdpa_max_abs_grad"] = max(float((a.float() - b.float()).abs().max()) for a, b in zip(g_ref, g_flex))
    missing = missing_kit_torch_names()
    if missing:
        return {**figures, "cp_mask": f"kit not runnable on torch {torch.__version__}: lacks {', '.join(missing)}"}
    from kit import context_parallel

    cp = args.cp
    q_index = context_parallel.headtail_index(seq, cp, 0).to(device)  # CP rank 0's head and tail chunks
    cp_dense = context_parallel.dense_mask(q_index, doc)
    cp_flex = context_parallel.flex_block_mask(q_index, doc, None)
    ql = q[:, :, q_index]
    o_dense = F.scaled_dot_product_attention(ql, k, F.pad(v, (0, qk - dv)), attn_mask=cp_dense, scale=scale)[..., :dv]
    o_cp = flex(ql, k, v, block_mask=cp_flex, scale=scale)
    figures["cp_flex_vs_dense_max_abs_out"] = float((o_dense.float() - o_cp.float()).abs().max())
    return figures


# ----------------------------------------------------------------------------------------
# (b) grouped expert GEMM.
# ----------------------------------------------------------------------------------------
def grouped_gemm_figures(m, seq: int, micro: int, device: torch.device, args) -> dict:
    """One expert projection (dim -> moe_hidden_dim) over the routed tokens of one rank, in
    groups of the local experts, bf16 against fp32 per-expert matmuls."""
    experts, rows = m.num_experts, seq * micro * m.top_k
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, m.dim, device=device, generator=g)
    w = torch.randn(experts, m.moe_hidden_dim, m.dim, device=device, generator=g) * m.dim ** -0.5
    counts = torch.full((experts,), rows // experts, device=device)
    counts[-1] += rows - int(counts.sum())
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    xb, wb = x.bfloat16(), w.bfloat16()
    out = torch._grouped_mm(xb, wb.transpose(-2, -1), offs=offs)
    ref = torch.cat([xs @ we.T for xs, we in zip(x.split(counts.tolist()), w)])  # fp32
    err = (out.float() - ref).abs().max() / ref.abs().max()
    sec = timed(lambda: torch._grouped_mm(xb, wb.transpose(-2, -1), offs=offs), device, args.warmup, args.iters)
    return {"grouped_mm_bf16_ms": 1e3 * sec, "grouped_mm_bf16_tflops": 2 * rows * m.dim * m.moe_hidden_dim / sec / 1e12,
            "grouped_mm_bf16_vs_fp32_max_rel_err": float(err), "experts": experts, "rows": rows}


# ----------------------------------------------------------------------------------------
# (d) the block: plain torch (ceiling) and the kit's.
# ----------------------------------------------------------------------------------------
class CeilingBlock(torch.nn.Module):
    """An A.X K1 MoE block in plain torch: MLA (q and kv latents, up-projections, document-masked
    attention; no RoPE rotation, a negligible cost), sigmoid top-k routing over the local
    experts, grouped-GEMM SwiGLU experts and the shared expert. `recompute` paper: the
    up-projections and the MoE rerun in backward (A.X K1 3.5)."""

    def __init__(self, m, attention, recompute: str):
        super().__init__()
        lin = lambda i, o: torch.nn.Linear(i, o, bias=False)  # noqa: E731
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        self.m, self.attention, self.recompute = m, attention, recompute
        self.attn_norm, self.ffn_norm = torch.nn.RMSNorm(m.dim), torch.nn.RMSNorm(m.dim)
        self.q_norm, self.kv_norm = torch.nn.RMSNorm(m.q_lora_rank), torch.nn.RMSNorm(m.kv_lora_rank)
        self.wq_a, self.wq_b = lin(m.dim, m.q_lora_rank), lin(m.q_lora_rank, m.n_heads * qk)
        self.wkv_a = lin(m.dim, m.kv_lora_rank + m.qk_rope_head_dim)
        self.wkv_b = lin(m.kv_lora_rank, m.n_heads * (m.qk_nope_head_dim + m.v_head_dim))
        self.wo, self.gate = lin(m.n_heads * m.v_head_dim, m.dim), lin(m.dim, m.num_experts)
        shared = m.num_shared_experts * m.moe_hidden_dim
        self.shared_w1, self.shared_w3, self.shared_w2 = lin(m.dim, shared), lin(m.dim, shared), lin(shared, m.dim)
        self.w13 = torch.nn.Parameter(torch.randn(m.num_experts, 2 * m.moe_hidden_dim, m.dim) * m.init_std)
        self.w2 = torch.nn.Parameter(torch.randn(m.num_experts, m.dim, m.moe_hidden_dim) * m.init_std)

    def up_projections(self, c_q, c_kv, k_pe):
        m, (B, L) = self.m, c_q.shape[:2]
        q = self.wq_b(self.q_norm(c_q)).view(B, L, m.n_heads, -1).transpose(1, 2)
        kv = self.wkv_b(self.kv_norm(c_kv)).view(B, L, m.n_heads, -1).transpose(1, 2)
        k_nope, v = kv.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None].expand(-1, m.n_heads, -1, -1)], dim=-1)
        return q, k, v

    def moe(self, x):
        m, (B, L, D) = self.m, x.shape
        x = x.reshape(-1, D)
        scores = torch.sigmoid(self.gate(x).float())
        weights, experts = scores.topk(m.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True) * m.route_scale).to(x.dtype)
        order = experts.flatten().argsort(stable=True)
        offs = torch.cumsum(torch.bincount(experts.flatten(), minlength=m.num_experts), 0, dtype=torch.int32)
        routed = x[order // m.top_k]
        g, u = torch._grouped_mm(routed, self.w13.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        out = torch._grouped_mm(F.silu(g) * u, self.w2.transpose(-2, -1), offs=offs)
        combined = torch.zeros_like(x).index_add_(0, order // m.top_k, out * weights.flatten()[order, None])
        shared = self.shared_w2(F.silu(self.shared_w1(x)) * self.shared_w3(x))
        return (combined + shared).view(B, L, D)

    def forward(self, x, mask):
        m, h = self.m, self.attn_norm(x)
        c_kv, k_pe = self.wkv_a(h).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        args = (self.wq_a(h), c_kv, k_pe)
        paper = self.recompute == "paper"
        q, k, v = checkpoint(self.up_projections, *args, use_reentrant=False) if paper else self.up_projections(*args)
        out = self.attention(q, k, v, mask)
        x = x + self.wo(out.transpose(1, 2).reshape(*x.shape[:2], -1))
        h = self.ffn_norm(x)
        return x + (checkpoint(self.moe, h, use_reentrant=False) if paper else self.moe(h))


def ceiling_attention(m, seq: int, micro: int, pos: torch.Tensor, device: torch.device):
    """(kernel, mask) for CeilingBlock: compiled flex + BlockMask on a GPU, SDPA + dense mask elsewhere."""
    qk, dv = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
    doc = torch.cumsum(pos == 0, dim=1)
    if device.type == "cuda":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention)
        mask = create_block_mask(lambda b, h, qi, ki: (doc[b, qi] == doc[b, ki]) & (ki <= qi), micro, None, seq, seq,
                                 device=device)
        return (lambda q, k, v, mask: flex(q, k, v, block_mask=mask, scale=qk ** -0.5)), mask
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril_()
    mask = ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]
    return (lambda q, k, v, mask: F.scaled_dot_product_attention(
        q, k, F.pad(v, (0, qk - dv)), attn_mask=mask, scale=qk ** -0.5)[..., :dv]), mask


def kit_block(m, hw, fp8: bool, recompute: str, device: torch.device):
    """model.py's block (layer 0 of a one-layer proxy model) as the trainer builds it: the
    hardware config's attention kernel and expert GEMM dtype, torchtitan's FP8 converter,
    the kit's `paper` recomputation. Returns (block, its forward(x, positions))."""
    import model as axk1
    from kit import memory_features, training

    if hw.attention == "flex":
        import kernels
        kernels.set_flex_compile(hw.flex_compile)
    tree = axk1.build_model_config(m, attention=hw.attention, expert_gemm_dtype=hw.expert_gemm_dtype,
                                   expert_fuse_gate_up=hw.expert_fuse_gate_up, bias_update_rate=0.0)
    if fp8:  # as training.build_model_parts: torchtitan's converter swaps the Linear configs
        tree = training.float8_converter(hw).build().convert(tree)
    with torch.device(device):
        net = tree.build()
    if recompute != "none":
        memory_features.activation_checkpoint_config(recompute).build().apply(net)
    with torch.no_grad():
        net.init_states(buffer_device=device)
        for param in net.parameters():  # parameters in the compute dtype (FSDP's param_dtype); RoPE stays complex
            param.data = param.data.to(getattr(torch, hw.param_dtype))
    block = net.layers["0"]
    return block, lambda x, pos: block(x, net.get_attention_masks(pos), pos)


def block_figures(build: str, m, seq: int, micro: int, hw, fp8: bool, recompute: str, device: torch.device,
                  args) -> dict:
    dtype = torch.bfloat16 if build == "ceiling" or hw.param_dtype == "bfloat16" else torch.float32
    pos = packed_positions(micro, seq, args.doc_len).to(device)
    if build == "ceiling":
        kernel, mask = ceiling_attention(m, seq, micro, pos, device)
        block = CeilingBlock(m, kernel, recompute).to(device=device, dtype=dtype)
        if fp8:
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training
            convert_to_float8_training(block, config=Float8LinearConfig.from_recipe_name("tensorwise"),
                                       module_filter_fn=lambda mod, fqn: fqn != "gate")  # the router stays bf16
        forward = lambda x, pos: block(x, mask)  # noqa: E731
    else:
        block, forward = kit_block(m, hw, fp8, recompute, device)
    x = torch.randn(micro, seq, m.dim, device=device, dtype=dtype)

    def step():
        xr = x.detach().requires_grad_()
        forward(xr, pos).float().square().mean().backward()

    sec = timed(step, device, args.warmup, args.iters)
    block.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base  # activations + gradients + transients of one step
    else:
        with activation_memory.SavedActivationBytes() as meter:
            out = forward(x.detach().requires_grad_(), pos).float().square().mean()
            peak = meter.alive()  # what autograd keeps for backward (no CUDA allocator here)
        del out
    tokens = micro * seq
    flops = block_flops_per_token(m, seq) * tokens / sec
    predicted = activation_memory.activation_bytes_per_layer(m, seq, micro, recompute, torch.finfo(dtype).bits // 8,
                                                             moe=True, device=device.type)
    grads = sum(p.numel() * p.element_size() for p in block.parameters())
    return {"tokens_per_s": tokens / sec, "tflops": flops / 1e12, "mfu": flops / (hw.peak_tflops * 1e12),
            "mfu_of_measured_ceiling": (flops / (hw.measured_bf16_tflops * 1e12)) if hw.get("measured_bf16_tflops")
            else None, "ms": 1e3 * sec, "peak_mem_bytes": int(peak),
            "predicted_mem_bytes": int(predicted + (grads if device.type == "cuda" else 0))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="conf/model/tiny.yaml shapes (seconds on a CPU)")
    ap.add_argument("--parts", default="a,b,d", help="comma list of a, b, d")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--doc-len", type=int, default=None, help="packed document length (default: seq_len / 4)")
    ap.add_argument("--cp", type=int, default=4, help="CP degree of the mask comparison (paper 3.4: CP 4 at 16K)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_step.py: no CUDA device here (torch.cuda.is_available() is False); "
                         "use --device cpu --tiny for the CPU check")
    device = torch.device(args.device)
    m, seq, micro, ep, hw = proxy_setup(args.tiny, args.device)
    args.doc_len = args.doc_len or seq // 4
    parts = set(args.parts.split(","))
    result = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "shapes": {"dim": m.dim, "heads": m.n_heads, "local_experts": m.num_experts, "ep": ep, "top_k": m.top_k,
                         "seq_len": seq, "micro_batch": micro}}
    if "a" in parts:
        result["attention"] = attention_figures(m, seq, micro, device, args)
    if "b" in parts:
        result["grouped_gemm"] = grouped_gemm_figures(m, seq, micro, device, args)
    if "d" in parts:
        missing = missing_kit_torch_names()
        for build in ("ceiling", "kit"):
            for fp8 in ([False, True] if device.type == "cuda" else [False]):  # FP8 needs FP8 tensor cores
                for recompute in ("none", "paper"):
                    key = f"{build}_{'fp8' if fp8 else 'bf16'}_{recompute}"
                    if build == "kit" and missing:
                        result[key] = f"kit not runnable on torch {torch.__version__}: lacks {', '.join(missing)}"
                        continue
                    try:  # one variant failing on a GPU must not lose the others' figures
                        result[key] = block_figures(build, m, seq, micro, hw, fp8, recompute, device, args)
                    except Exception as e:  # noqa: BLE001  (reported in the JSON line)
                        result[key] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
        headline = next((result[k] for k in ("kit_bf16_none", "ceiling_bf16_none") if isinstance(result[k], dict)), {})
        result.update({k: headline.get(k) for k in ("tokens_per_s", "tflops", "mfu", "peak_mem_bytes", "predicted_mem_bytes")})
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
