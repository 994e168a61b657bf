"""Scaling-law planner (paper 2.2, 2.3, 3.3): compute budget, tokens, vocabulary, granularity,
peak LR and batch size. Formulas live here, their constants in conf/plan.yaml (each cited there).

The report's text extraction lost every formula of these sections ("elided"); the published forms
used instead are named in each function's docstring.
"""

from __future__ import annotations

import math

from omegaconf import DictConfig


def sustained_flops_per_gpu(ref: DictConfig) -> float:
    """FLOP/s one GPU sustains, from a published run: 6 * N_active * tokens / GPU-seconds.

    Paper 2.2 estimated it "based on efficiency characteristics in (Liu et al., 2024)" (the value is
    elided); we take DeepSeek-V3's own pre-training figures (conf/plan.yaml: reference_run).
    """
    return ref.flops_per_param_token * ref.active_params * ref.tokens / (ref.gpu_hours * 3600.0)


def compute_budget(gpus: int, days: float, flops_per_gpu: float) -> float:
    """C = GPUs x seconds x sustained FLOP/s (paper 2.2)."""
    return gpus * days * 86400.0 * flops_per_gpu


def tokens_for_budget(c: float, active_params: float, flops_per_param_token: float = 6.0) -> float:
    """D = C / (6 N): the tokens a budget buys at N active parameters (Kaplan et al. 2020, C = 6ND)."""
    return c / (flops_per_param_token * active_params)


def granularity(dim: int, expert_dim: int) -> float:
    """G = 2 d_model / d_expert (Tian et al. 2025 2.1; paper 2.2)."""
    return 2 * dim / expert_dim


def tokens_per_char(v: float, a: float, b: float, c: float) -> float:
    """f(V) = a ln^2 V + b ln V + c: tokens per character of a BPE vocabulary of size V
    (Tao et al. 2024, 4.2, fitted coefficients in their released approach2_derivative.py)."""
    lv = math.log(v)
    return a * lv * lv + b * lv + c


def vocab_flops_derivative(v: float, n_nv: float, d: int, a: float, b: float, c: float) -> float:
    """dC/dV / (6H) for C = 6 (N_nv + V d) H f(V) at a fixed number of characters H (Tao et al. 2024,
    Approach 2): d f(V) + (N_nv + V d) f'(V), with f'(V) = (2 a ln V + b) / V."""
    lv = math.log(v)
    return d * tokens_per_char(v, a, b, c) + (n_nv + v * d) * (2 * a * lv + b) / v


def vocab_compute_optimal(n_nv: float, d: int, a: float, b: float, c: float,
                          lo: float = 1e3, hi: float = 1e8) -> float:
    """The V where dC/dV = 0 (Tao et al. 2024, Approach 2, "derivative-based fast estimation"):
    below it a larger vocabulary saves more FLOPs by shortening the text than its parameters cost.
    Solved by bisection on log V (the derivative is negative below the root, positive above)."""
    if vocab_flops_derivative(lo, n_nv, d, a, b, c) >= 0 or vocab_flops_derivative(hi, n_nv, d, a, b, c) <= 0:
        raise ValueError(f"vocab_compute_optimal: no root in [{lo:g}, {hi:g}] for N_nv={n_nv:g}, d={d}")
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if vocab_flops_derivative(mid, n_nv, d, a, b, c) < 0:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def round_to_multiple(x: float, k: int) -> int:
    return int(k * round(x / k))


def lr_peak(c: float, coef: float, exp: float) -> float:
    """eta_opt = coef * C^exp (Tian et al. 2025, eq. 3: 1.1576 * C^-0.1529 for MoE)."""
    return coef * c ** exp


def batch_tokens(c: float, coef: float, exp: float) -> float:
    """B_opt = coef * C^exp tokens (Tian et al. 2025, eq. 3: 0.0694 * C^0.3644 for MoE)."""
    return coef * c ** exp


def plan(m: DictConfig, pc: DictConfig) -> dict:
    """Every planner figure for model config `m` under the constants `pc` (conf/plan.yaml: plan)."""
    from kit import cost_model

    flops_gpu = sustained_flops_per_gpu(pc.reference_run)
    c = compute_budget(pc.gpus, pc.days, flops_gpu)
    n_nv = cost_model.param_counts(m)["non_vocab_active"]
    v_opt = vocab_compute_optimal(n_nv, m.dim, pc.vocab.a, pc.vocab.b, pc.vocab.c)
    v_raised = v_opt * (1 + pc.vocab.raise_fraction)
    b_tok = batch_tokens(c, pc.batch_law.coef, pc.batch_law.exp)
    return {
        "gpus": pc.gpus, "days": pc.days, "sustained_flops_per_gpu": flops_gpu, "compute_budget": c,
        "active_params": pc.active_params,
        "train_tokens": tokens_for_budget(c, pc.active_params, pc.reference_run.flops_per_param_token),
        "granularity": granularity(m.dim, m.moe_hidden_dim),
        "granularity_optimal_range": list(pc.granularity_optimal_range),
        "non_vocab_params": n_nv, "vocab_compute_optimal": v_opt, "vocab_raised": v_raised,
        "vocab_chosen": round_to_multiple(v_raised, pc.vocab.round_to),
        "lr_peak": lr_peak(c, pc.lr_law.coef, pc.lr_law.exp),
        "batch_tokens": b_tok, "batch_sequences": b_tok / pc.seq_len,
    }
