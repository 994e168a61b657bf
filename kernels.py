"""Hardware-dependent kernels and the checks that go with them.

The model code never asks "am I on a CPU?": the hardware config names the attention kernel and
the expert GEMM dtype, and this module maps those names to torchtitan modules (or to our own
where torchtitan has no CPU path). Everything here is selected by `conf/hardware/*.yaml`.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchtitan.models.common.attention import FlexAttention, VarlenAttention
from torchtitan.models.common.moe import GroupedExperts
from torchtitan.protocols.module import Module


# ----------------------------------------------------------------------------------------
# Attention: flex (GPU) or SDPA with a dense causal + document mask (CPU).
# ----------------------------------------------------------------------------------------
def document_causal_mask(positions: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool mask: query i sees key j iff j <= i and both are in the same document.

    Documents are recovered from reset-style positions (0 at each document start), the same
    convention torchtitan's flex mask uses, so both kernels mask identically.
    """
    doc = torch.cumsum(positions == 0, dim=1)  # (B, L) document index
    L = positions.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=positions.device).tril_()
    same_doc = doc.unsqueeze(2) == doc.unsqueeze(1)
    return (same_doc & causal).unsqueeze(1)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A boolean keep-mask as SDPA's additive float mask (0 keep, -inf drop).

    SDPA converts a boolean mask to this form inside every call, i.e. once per layer, and the
    fused kernel keeps that copy for backward: (B, 1, L, L) floats per layer. Converting once per
    forward lets all layers share one.
    """
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class DocumentSDPA(Module):
    """Inner attention on `F.scaled_dot_product_attention` with an explicit mask.

    Flex attention has no CPU backward; SDPA's math/CPU-flash kernels do, and accept the same
    causal + document mask as a boolean tensor. Layout in/out is torchtitan's (B, L, N, H).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        pass

    def __init__(self, config: Config):
        super().__init__()

    def forward(self, q_BLNH, k_BLNH, v_BLNH, *, attention_masks=None, scale=None, **_):
        if attention_masks is None:
            raise ValueError("DocumentSDPA needs the causal+document mask from get_attention_masks(positions)")
        # MLA's values are narrower than its queries/keys (v 128 vs qk 192 at 519B). PyTorch's fused
        # CPU kernel wants one head dim, and otherwise falls back to the unfused math path, which
        # keeps the (B, N, L, L) probabilities for backward and runs as many small ops. Zero-padding
        # v to the qk width keeps the fused kernel (it saves q, k, v, out and the log-sum-exp, as
        # flex attention does on GPU) and leaves the first v-width output columns unchanged.
        dv = v_BLNH.shape[-1]
        if dv < q_BLNH.shape[-1]:
            v_BLNH = F.pad(v_BLNH, (0, q_BLNH.shape[-1] - dv))
        if attention_masks.dtype != torch.bool and attention_masks.dtype != q_BLNH.dtype:
            attention_masks = attention_masks.to(q_BLNH.dtype)
        out = F.scaled_dot_product_attention(
            q_BLNH.transpose(1, 2), k_BLNH.transpose(1, 2), v_BLNH.transpose(1, 2),
            attn_mask=attention_masks, scale=scale,
        )
        return out.transpose(1, 2)[..., :dv]


# hardware.flex_compile -> the inductor options torchtitan's FlexAttention compiles flex_attention
# with. torchtitan builds that compiled function once, at import, from the class attribute
# FlexAttention.inductor_configs (max_autotune + coordinate descent: the fastest kernels, but the
# first step autotunes for minutes); its comment recommends turning autotuning off once tuned.
FLEX_COMPILE = {
    "max-autotune": {"max_autotune": True, "coordinate_descent_tuning": True},  # torchtitan's own setting
    "default": {"max_autotune": False, "coordinate_descent_tuning": False},     # inductor's defaults: seconds
}


def set_flex_compile(mode: str) -> None:
    """Compile torchtitan's flex attention in `mode` (a FLEX_COMPILE key): both class attributes
    torchtitan reads at call time are replaced (the compiled function and the options its
    regional-inductor path uses), every other inductor option kept."""
    if mode not in FLEX_COMPILE:
        raise ValueError(f"hardware.flex_compile={mode!r}: expected one of {sorted(FLEX_COMPILE)}")
    from torch.nn.attention.flex_attention import flex_attention

    options = {**FlexAttention.inductor_configs, **FLEX_COMPILE[mode]}
    if options != FlexAttention.inductor_configs:
        FlexAttention.inductor_configs = options
        FlexAttention._compiled_flex_attn = torch.compile(flex_attention, options=options)


def attention_config(name: str) -> Module.Config:
    if name == "sdpa":
        return DocumentSDPA.Config()
    if name == "flex":
        return FlexAttention.Config()
    if name == "varlen":
        return VarlenAttention.Config()
    raise ValueError(f"hardware.attention: expected one of sdpa|flex|varlen, got {name!r}")


# ----------------------------------------------------------------------------------------
# Routed experts: torchtitan's grouped GEMM, in the dtype the hardware is fast at.
# ----------------------------------------------------------------------------------------
class GroupedExpertsMM(GroupedExperts):
    """torchtitan's GroupedExperts with a configurable GEMM dtype and optional gate+up fusion.

    torchtitan casts expert inputs and weights to bf16 before `torch._grouped_mm`. That is the
    right call on H100/H200 tensor cores, but CPUs without native bf16 (AMX, AVX512-BF16) run
    bf16 GEMMs ~9x slower than fp32 (bench/cpu_step.py; 8.9 vs 76 GFLOP/s for the tiny model's
    expert shapes on such a CPU), which made the whole CPU step ~3x slower than transformers'
    reference. The dtype comes from `hardware.expert_gemm_dtype`; on GPU it stays bf16 (a no-op
    cast under FSDP bf16 params).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(GroupedExperts.Config):
        gemm_dtype: str = "bfloat16"
        fuse_gate_up: bool = False

    def __init__(self, config: Config):
        super().__init__(config)
        self.gemm_dtype = getattr(torch, config.gemm_dtype)
        self.fuse_gate_up = config.fuse_gate_up

    def forward(self, x_RD: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = (w.to_local() if hasattr(w, "to_local") else w for w in (self.w1_EFD, self.w2_EDF, self.w3_EFD))
        offs = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
        x = x_RD.to(self.gemm_dtype)
        if self.fuse_gate_up:
            # Gate and up projections as one grouped GEMM of width 2F, as transformers does: wider
            # GEMMs for small experts (+2-3% CPU step). The concatenated weights are a copy that
            # autograd keeps until backward, ~1.4 GB per layer at 519B (24 local experts, bf16): GPU
            # configs leave it off.
            w13 = torch.cat([w1, w3], dim=1).to(self.gemm_dtype)
            g, u = self._grouped_mm(A=x, B_t=w13.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
            h = F.silu(g) * u
        else:
            h = F.silu(self._grouped_mm(A=x, B_t=w1.to(self.gemm_dtype).transpose(-2, -1), offs=offs))
            h = h * self._grouped_mm(A=x, B_t=w3.to(self.gemm_dtype).transpose(-2, -1), offs=offs)
        return self._grouped_mm(A=h, B_t=w2.to(self.gemm_dtype).transpose(-2, -1), offs=offs).type_as(x_RD)


# ----------------------------------------------------------------------------------------
# Optional GPU-only pieces: fail early with one clear line when they cannot run.
# ----------------------------------------------------------------------------------------
# The DeepEP v2 surface torchtitan 0.3.0 calls (torchtitan/distributed/deepep/deepep.py): the
# ElasticBuffer class, its methods and the keywords passed to them. DeepEP v1 (PyPI's deep-ep 1.0.0)
# has a `Buffer` with another API, which only fails once the model is built.
DEEPEP_V2_CALLS = {
    "__init__": ("num_bytes", "num_max_tokens_per_rank", "hidden", "num_topk", "use_fp8_dispatch",
                 "deterministic", "explicitly_destroy"),
    "get_buffer_size_hint": ("num_topk", "use_fp8_dispatch"),
    "get_theoretical_num_sms": (),
    "dispatch": ("topk_idx", "topk_weights", "num_experts", "num_max_tokens_per_rank", "num_sms",
                 "do_expand", "do_cpu_sync", "handle"),
    "combine": ("handle", "topk_weights", "async_with_compute_stream"),
}
DEEPEP_INSTALL = "build DeepEP v2 with `make deepep DEEPEP_SRC=/path/to/DeepEP` (README 'On a GPU node')"


def deepep_v2_missing(deep_ep) -> list[str]:
    """What of DEEPEP_V2_CALLS the module `deep_ep` lacks (empty: torchtitan's calls will bind)."""
    buffer_cls = getattr(deep_ep, "ElasticBuffer", None)
    if not isinstance(buffer_cls, type):
        return ["ElasticBuffer"]
    missing = []
    for method, keywords in DEEPEP_V2_CALLS.items():
        fn = getattr(buffer_cls, method, None)
        if not callable(fn):
            missing.append(f"ElasticBuffer.{method}")
            continue
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):  # a compiled method: its name is all Python can see
            continue
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            missing += [f"ElasticBuffer.{method}({k}=)" for k in keywords if k not in params]
    return missing


def check_moe_comm_backend(name: str) -> None:
    if name not in ("standard", "deepep"):
        raise ValueError(f"parallelism.moe_comm_backend: expected standard|deepep, got {name!r}")
    if name != "deepep":
        return
    try:
        deep_ep = importlib.import_module("deep_ep")
    except ModuleNotFoundError:
        raise RuntimeError(f"parallelism.moe_comm_backend=deepep needs DeepEP v2 (deep_ep), not installed here: "
                           f"{DEEPEP_INSTALL}, or use moe_comm_backend=standard.") from None
    except Exception as error:  # deep_ep checks its NCCL and CUDA at import
        raise RuntimeError(f"parallelism.moe_comm_backend=deepep: deep_ep fails to import "
                           f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from error
    missing = deepep_v2_missing(deep_ep)
    if missing:
        version = getattr(deep_ep, "__version__", "of unknown version")
        raise RuntimeError(f"parallelism.moe_comm_backend=deepep needs DeepEP v2, whose deep_ep.ElasticBuffer "
                           f"torchtitan 0.3.0 calls; the installed deep_ep {version} lacks {', '.join(missing[:4])} "
                           f"(the v1 API, like PyPI's deep-ep 1.0.0): {DEEPEP_INSTALL}.")


def check_float8(enabled: bool, device: str) -> None:
    if enabled and (device != "cuda" or not torch.cuda.is_available()):
        raise RuntimeError("hardware.float8=true needs CUDA GPUs with FP8 tensor cores (H100/H200); "
                           "this run's device has none. Use a hardware config with float8: false.")
