"""The paper's memory features (A.X K1 report 3.5, Table 2), each behind a config switch.

  * `PaperAC` (parallelism.activation_checkpoint=paper): selective recomputation as the paper
    describes it: recompute the MLA up-projections and the MLP/MoE blocks, keep everything
    else. A torchtitan `ActivationCheckpointing` policy, so torchtitan's parallelize applies it
    at the same point as its own none/selective/full modes (after EP, before FSDP).
  * `ChunkedHead` (parallelism.ce_chunk_tokens=N): the LM head (shared by the MTP heads) can
    return a summed cross-entropy computed N tokens at a time, recomputing each chunk's logits in
    backward, so the [tokens x vocab] fp32 logits never exist at once ("cross-entropy fusion",
    Table 2).
  * `AdamWBF16Moments` (optim.moment_dtype=bfloat16): AdamW with FP32 master weights and
    gradients and BF16 first/second moments.

activation_memory.py predicts what each of these saves; tests/test_memory_features.py measures it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    checkpoint_wrapper,
)
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import (
    CheckpointPolicy,
    create_selective_checkpoint_contexts,
)
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.distributed.activation_checkpoint import ActivationCheckpointing
from torchtitan.models.common import Linear


# ----------------------------------------------------------------------------------------
# Selective recomputation, paper 3.5.
# ----------------------------------------------------------------------------------------
def _resolve(*paths: str) -> set:
    """Ops by dotted name under torch.ops, skipping those this build lacks (e.g. CUDA-only)."""
    ops = set()
    for path in paths:
        obj = torch.ops
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except (AttributeError, RuntimeError):
            continue
        ops.add(obj)
    return ops


# The attention kernels whose outputs (output, log-sum-exp) are kept: the core attention is
# not recomputed, only the q/k/v it reads are rebuilt from the latents.
ATTENTION_KERNELS = _resolve(
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default",
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten._scaled_dot_product_fused_attention_overrideable.default",
    "torch_attn._varlen_attn.default",
) | {torch._higher_order_ops.flex_attention}
# Router choices are kept so a recomputed MoE block routes exactly as in forward (top-k can
# break near-ties differently on a rerun).
ROUTING_OPS = _resolve("aten.topk.default")


class _Keep:
    """Set while a kept module (an MLA down-projection) runs: its ops' outputs are saved."""

    def __init__(self):
        self.active = False

    def hook(self, module: torch.nn.Module) -> None:
        module.register_forward_pre_hook(lambda *_: setattr(self, "active", True))
        module.register_forward_hook(lambda *_: setattr(self, "active", False))


def _policy(keep: _Keep | None, save_ops: set):
    def policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
        if func in save_ops or (keep is not None and keep.active):
            return CheckpointPolicy.MUST_SAVE
        if func == torch.ops.aten._to_copy.default and "cuda" in str(args[0].device) \
                and str(kwargs.get("device", "")) == "cpu":
            return CheckpointPolicy.MUST_SAVE  # device->host copies (all-to-all split sizes): a sync
        return CheckpointPolicy.PREFER_RECOMPUTE
    return policy


def _wrap(module: torch.nn.Module, keep: _Keep | None, save_ops: set, cfg) -> torch.nn.Module:
    return checkpoint_wrapper(
        module, context_fn=lambda: create_selective_checkpoint_contexts(_policy(keep, save_ops)),
        preserve_rng_state=cfg.preserve_rng_state, determinism_check=cfg.determinism_check,
        early_stop=False, debug=cfg.debug,
    )


class PaperAC(ActivationCheckpointing):
    """Recompute the MLA up-projections and the MLP/MoE blocks (A.X K1 3.5).

    Attention: one selective-checkpoint region over the attention module that keeps the
    outputs of the down-projections (the latents c_q and [c_kv, k_pe]) and of the attention
    kernel (output, log-sum-exp), and recomputes q_norm/kv_norm, the up-projections wq_b/wkv_b,
    RoPE and the q/k concat in backward: the large q, k, v tensors are not kept, the latents
    (~1/10 of their size at 519B) are, and the core attention never reruns. Megatron-LM calls
    this "mla_up_proj" recomputation.
    MLP/MoE: the dense MLP / the MoE block (router, dispatch, experts, shared expert, combine)
    reruns from its input; only the router's top-k choices are kept. The norms around both and
    the residual stream are kept, as the paper says ("other components were left unchanged").
    Applied to the main layers and the MTP layers (torchtitan's own modes skip MTP layers).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(ActivationCheckpointing.Config):
        pass

    def apply(self, model: torch.nn.Module) -> None:
        blocks = list(model.get_submodule("layers").values()) + list(getattr(model, "mtp_layers", None) or [])
        for block in blocks:
            keep = _Keep()
            for name in ("wq_a", "wq", "wkv_a"):  # wq: MLA without a q latent (q_lora_rank 0)
                if hasattr(block.attention, name):
                    keep.hook(getattr(block.attention, name))
            block.register_module("attention", _wrap(block.attention, keep, ATTENTION_KERNELS, self.config))
            name = "moe" if block.moe_enabled else "feed_forward"
            block.register_module(name, _wrap(getattr(block, name), None, ROUTING_OPS, self.config))


def activation_checkpoint_config(mode: str):
    """parallelism.activation_checkpoint -> the config torchtitan's parallelize applies."""
    from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

    configs = {"none": None, "selective": SelectiveAC.Config, "full": FullAC.Config, "paper": PaperAC.Config}
    if mode not in configs:
        raise ValueError(f"parallelism.activation_checkpoint: expected one of {'|'.join(configs)}, got {mode!r}")
    return configs[mode]() if configs[mode] else None


# ----------------------------------------------------------------------------------------
# Chunked (fused) cross-entropy: logits exist one chunk of tokens at a time.
# ----------------------------------------------------------------------------------------
class _ChunkedLinearCE(torch.autograd.Function):
    """sum over tokens of CE(h @ W^T, labels), IGNORE_INDEX skipped, `chunk` tokens at a time.

    Forward keeps only h, W and the labels; backward recomputes each chunk's logits and turns
    them into that chunk's gradient at once: dlogits = g * (softmax - onehot), dh = dlogits W,
    dW += dlogits^T h. Logits and softmax are fp32 as in torchtitan's cross_entropy_loss; the
    GEMMs run in the activation dtype like the plain head's.
    """

    @staticmethod
    def forward(ctx, h_TD, w_VD, labels_T, chunk: int):
        total = torch.zeros((), dtype=torch.float32, device=h_TD.device)
        for s in range(0, h_TD.shape[0], chunk):
            logits = (h_TD[s:s + chunk] @ w_VD.t()).float()
            total += F.cross_entropy(logits, labels_T[s:s + chunk], reduction="sum", ignore_index=IGNORE_INDEX)
        ctx.save_for_backward(h_TD, w_VD, labels_T)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_total):
        h_TD, w_VD, labels_T = ctx.saved_tensors
        dh = torch.empty_like(h_TD)
        dw = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device)
        for s in range(0, h_TD.shape[0], ctx.chunk):
            h, y = h_TD[s:s + ctx.chunk], labels_T[s:s + ctx.chunk]
            dlogits = torch.softmax((h @ w_VD.t()).float(), dim=-1)
            valid = y != IGNORE_INDEX
            rows = torch.arange(y.shape[0], device=y.device)[valid]
            dlogits[rows, y[valid]] -= 1.0
            dlogits[~valid] = 0.0
            dlogits = dlogits.mul_(grad_total).to(h.dtype)
            dh[s:s + ctx.chunk] = dlogits @ w_VD
            dw += (dlogits.t() @ h).float()
        return dh, dw.to(w_VD.dtype), None, None


class ChunkedHead(Linear):
    """The output head. `head(h)` gives logits, as torchtitan's Linear; `head(h, labels=y)` gives
    the summed CE over those labels, `chunk_tokens` tokens at a time (memory.ChunkedLinearCE).

    Going through the module call matters: FSDP2 unshards the weight in the head's forward hook
    and reduce-scatters its gradient after backward. While `defer` is set (see `head_in_loss`)
    `head(h)` returns h unchanged, so the model forward hands the loss its final hidden states
    (main and MTP) instead of logits; torchtitan's MTP decoder calls the same head for both.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(Linear.Config):
        chunk_tokens: int = 0

    def __init__(self, config: Config):
        super().__init__(config)
        self.chunk_tokens = config.chunk_tokens
        self.defer = False

    def forward(self, input: torch.Tensor, *, labels: torch.Tensor | None = None) -> torch.Tensor:
        # `input` and keyword-only `labels`: torchtitan's sharding hook maps positional arguments
        # by name (its lm_head layout names `input`) and drops positional arguments it does not know.
        if labels is None:
            return input if self.defer else super().forward(input)
        h_TD = input.reshape(-1, input.shape[-1])
        w = self.weight.to_local() if isinstance(self.weight, DTensor) else self.weight
        return _ChunkedLinearCE.apply(h_TD, w, labels.reshape(-1), self.chunk_tokens or h_TD.shape[0])


@contextlib.contextmanager
def head_in_loss(head: torch.nn.Module | None):
    """While open, a ChunkedHead with chunk_tokens > 0 returns hidden states from the model
    forward; anything else (plain head, PP stages without the head) is left as it is."""
    on = isinstance(head, ChunkedHead) and head.chunk_tokens > 0
    if on:
        head.defer = True
    try:
        yield on
    finally:
        if on:
            head.defer = False


# ----------------------------------------------------------------------------------------
# AdamW with BF16 moments, FP32 master weights and gradients (paper 3.5).
# ----------------------------------------------------------------------------------------
class AdamWBF16Moments(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) whose exp_avg / exp_avg_sq are stored in
    BF16; each step updates them in FP32 and rounds them back, and the FP32 parameter is
    updated from the FP32 values. State names and shapes match torch.optim.AdamW, so DCP
    checkpoints have the same keys at half the optimizer-state bytes.

    Why not a library optimizer: torch.optim.AdamW keeps moments in the parameter dtype (FP32
    here); torchao 0.18's optimizers either quantise the moments to 8/4-bit or FP8 blocks
    (AdamW8bit/4bit/Fp8) or keep them in the parameter dtype (_AdamW, whose BF16 option is
    stochastic rounding of BF16 weights) - none stores BF16 moments next to FP32 weights. Works on
    DTensor parameters (FSDP2): each step runs on the local shards.
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                t = float(state["step"])
                w, g = local(p), local(p.grad).float()
                m16, v16 = local(state["exp_avg"]), local(state["exp_avg_sq"])
                m = m16.float().lerp_(g, 1 - b1)
                v = v16.float().mul_(b2).addcmul_(g, g, value=1 - b2)
                m16.copy_(m)
                v16.copy_(v)
                w.mul_(1 - lr * wd)
                denom = (v.sqrt_() / math.sqrt(1 - b2 ** t)).add_(eps)
                w.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
        return loss


def build_adamw(params, o) -> torch.optim.Optimizer:
    """optim.moment_dtype float32 -> torch.optim.AdamW; bfloat16 -> AdamWBF16Moments."""
    kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    dtype = o.get("moment_dtype", "float32")
    if dtype == "float32":
        return torch.optim.AdamW(params, foreach=True, **kw)
    if dtype == "bfloat16":
        return AdamWBF16Moments(params, **kw)
    raise ValueError(f"optim/{o.name}.yaml moment_dtype={dtype!r}: expected float32|bfloat16")
