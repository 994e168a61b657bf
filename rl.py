"""On-policy RL pieces (paper 4.4): GSPO's sequence-level loss inside the DAPO framework, and the
reward R = R_correct + R_format (Eq. 3) with rule-based verifiers.

Everything here is pure tensor/string code so each piece is pinned by hand-computed tests
(tests/test_rl.py); stages/rl_train.py wires it to the model and to KV-cached rollouts.

GSPO (Zheng et al. 2025): the importance ratio is the length-normalised sequence likelihood ratio
    s_i = exp( (1/|y_i|) * sum_t (log pi_new(y_i,t) - log pi_old(y_i,t)) )
and clipping acts on s_i as a whole: one clip decision per sequence, not per token, which is what
makes it robust to the per-token likelihood noise that MoE routing changes cause (paper 4.4).
DAPO (Yu et al. 2025) contributes the decoupled clip range [1 - eps_low, 1 + eps_high]
("clip-higher"), dynamic sampling (drop groups whose rewards are all equal: zero advantage, zero
gradient), overlong filtering (truncated samples carry no loss) and soft overlong punishment.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from kit import tool_calls

THINK, END_THINK = "<think>", "</think>"
MODES = ("thinking", "non_thinking")
CONTROL_TAG = {"thinking": THINK, "non_thinking": END_THINK}  # what the prompt ends with (paper 4.4)


# ----------------------------------------------------------------------------------------
# GSPO loss + DAPO clip-higher
# ----------------------------------------------------------------------------------------
def sequence_log_ratio(logp_new: torch.Tensor, logp_old: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] token log-probs of the sampled response tokens -> [B] mean log-ratio per sequence."""
    m = mask.to(logp_new.dtype)
    return ((logp_new - logp_old) * m).sum(-1) / m.sum(-1).clamp(min=1.0)


def gspo_loss(logp_new, logp_old, mask, advantages, eps_low: float, eps_high: float,
              aggregation: str = "seq-mean") -> tuple[torch.Tensor, dict]:
    """GSPO objective with DAPO's decoupled clip range, as a loss to minimise.

    per sequence: J_i = min(s_i * A_i, clip(s_i, 1 - eps_low, 1 + eps_high) * A_i)
    aggregation "seq-mean": mean_i J_i (GSPO); "token-mean": sum_i |y_i| J_i / sum_i |y_i|
    (DAPO's token-level averaging: long responses weigh by their length).
    Sequences whose mask is all zero (overlong-filtered) contribute nothing to either mean.
    """
    lengths = mask.to(logp_new.dtype).sum(-1)
    live = lengths > 0
    s = torch.exp(sequence_log_ratio(logp_new, logp_old, mask))
    clipped = torch.clamp(s, 1.0 - eps_low, 1.0 + eps_high)
    per_seq = torch.minimum(s * advantages, clipped * advantages)
    if aggregation == "seq-mean":
        w = live.to(s.dtype)
    elif aggregation == "token-mean":
        w = lengths
    else:
        raise ValueError(f"rl.aggregation={aggregation!r}: expected 'seq-mean' or 'token-mean'")
    loss = -(per_seq * w).sum() / w.sum().clamp(min=1e-12)
    with torch.no_grad():
        hit = ((s < 1.0 - eps_low) & (advantages < 0)) | ((s > 1.0 + eps_high) & (advantages > 0))
        m = mask.to(logp_new.dtype)
        stats = {"ratio_mean": float(s[live].mean()) if live.any() else 1.0,
                 "clip_frac": float(hit[live].float().mean()) if live.any() else 0.0,
                 # how far the policy has moved from the sampling one: mean |log ratio| per token
                 # and per sequence (what the clip range acts on)
                 "token_drift": float(((logp_new - logp_old).abs() * m).sum() / m.sum().clamp(min=1.0)),
                 "seq_log_ratio_abs": float(torch.log(s[live]).abs().mean()) if live.any() else 0.0}
    return loss, stats


# ----------------------------------------------------------------------------------------
# Group-relative advantages, dynamic sampling, overlong handling (DAPO)
# ----------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(r - group mean) / (group std + eps); std is the population std of the group."""
    r = rewards.view(-1, group_size)
    mean, std = r.mean(-1, keepdim=True), r.std(-1, unbiased=False, keepdim=True)
    return ((r - mean) / (std + eps)).view(-1)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[n_groups] bool: False where every reward in the group is identical (no learning signal)."""
    r = rewards.view(-1, group_size)
    return (r.max(-1).values - r.min(-1).values) > 1e-9


def overlong_penalty(length: int, max_len: int, cache_len: int) -> float:
    """DAPO soft overlong punishment: 0 up to max_len - cache_len, then linear down to -1 at
    max_len, -1 beyond."""
    start = max_len - cache_len
    if length <= start:
        return 0.0
    if length <= max_len:
        return (start - length) / cache_len
    return -1.0


def collect_groups(sample_groups: Callable[[list], list], prompts: Iterator, rewards_of: Callable[[list], list],
                   n_groups: int, max_prompts: int, dynamic: bool = True, first_round: int = 0) -> tuple[list, dict]:
    """DAPO dynamic sampling: sample one group per prompt (`sample_groups` takes a list of
    prompts and returns their groups, so a round is one batched generation), drop groups whose
    rewards are all equal, and draw further prompts until n_groups informative groups are
    collected or max_prompts were tried (then train on what was found; the stats say so).
    The first round may over-sample (first_round prompts); groups beyond n_groups are discarded,
    so every step trains on the same number of groups, as in DAPO."""
    kept, tried, dropped = [], 0, 0
    while len(kept) < n_groups and tried < max_prompts:
        want = max(n_groups - len(kept), first_round if tried == 0 else 0)
        batch = [next(prompts) for _ in range(min(want, max_prompts - tried))]
        tried += len(batch)
        for group in sample_groups(batch):
            rewards = torch.tensor(rewards_of(group), dtype=torch.float64)
            if dynamic and not bool(informative_groups(rewards, len(group))[0]):
                dropped += 1
                continue
            kept.append(group)
    kept = kept[:n_groups]
    return kept, {"prompts_tried": tried, "groups_dropped": dropped, "groups_kept": len(kept)}


# ----------------------------------------------------------------------------------------
# Format reward (Eq. 3): -1 for malformed or mode-violating think tags, 0 for a valid structure
# ----------------------------------------------------------------------------------------
def split_response(completion: str, mode: str) -> tuple[bool, str, str, str]:
    """Parse a completion generated after the prompt's control tag.

    thinking mode (prompt ends with <think>): completion = reasoning </think> response, with no
    other tag anywhere, non-empty reasoning and non-empty response.
    non-thinking mode (prompt ends with </think>): completion = response, with no <think> or
    </think> at all, non-empty.
    Returns (well_formed, reason, reasoning, response); reason is "" when well formed.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    n_open, n_close = completion.count(THINK), completion.count(END_THINK)
    if mode == "non_thinking":
        if n_open or n_close:
            return False, "think tag in non-thinking output", "", completion
        if not completion.strip():
            return False, "empty response", "", completion
        return True, "", "", completion.strip()
    if n_open:
        return False, "duplicated <think>", "", completion
    if n_close == 0:
        return False, "unclosed <think>", completion, ""
    if n_close > 1:
        return False, "duplicated </think>", "", completion
    reasoning, response = completion.split(END_THINK)
    if not reasoning.strip():
        return False, "empty reasoning", reasoning, response
    if not response.strip():
        return False, "empty response after </think>", reasoning, response
    return True, "", reasoning.strip(), response.strip()


def format_reward(completion: str, mode: str) -> float:
    return 0.0 if split_response(completion, mode)[0] else -1.0


def mode_obeyed(completion: str, mode: str) -> bool:
    """Did the output follow the requested mode at all (looser than well-formed)? thinking: it
    closed a think block after some reasoning; non-thinking: it emitted no think tag."""
    if mode == "non_thinking":
        return THINK not in completion and END_THINK not in completion
    head = completion.split(END_THINK)[0]
    return END_THINK in completion and bool(head.strip()) and THINK not in head


# ----------------------------------------------------------------------------------------
# Verifiers: exact answers and IFEval-style constraints
# ----------------------------------------------------------------------------------------
_NUM = r"-?\d[\d,]*(?:\.\d+)?"
_ANSWER_CUES = re.compile(r"(?:answer|정답|답)\s*(?:is|은|는|:|=)?\s*:?\s*(" + _NUM + ")", re.IGNORECASE)
_HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
_LATIN = re.compile(r"[A-Za-z]")


def extract_answer(response: str) -> str | None:
    """Final answer: the last 'Answer: X' / '정답: X' cue, else the last number in the response."""
    cues = _ANSWER_CUES.findall(response)
    if cues:
        return cues[-1].replace(",", "")
    nums = re.findall(_NUM, response)
    return nums[-1].replace(",", "") if nums else None


def numeric_equal(a: str | None, b: str, tol: float = 1e-6) -> bool:
    if a is None:
        return False
    try:
        return abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b)))
    except ValueError:
        return a.strip() == b.strip()


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?。])\s+|\n+", text.strip()) if s.strip()]


def _is_json(text: str) -> bool:
    t = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    try:
        return isinstance(json.loads(t), (dict, list))
    except ValueError:
        return False


CONSTRAINTS: dict[str, Callable[[str, dict], bool]] = {
    "max_words": lambda t, c: len(t.split()) <= c["n"],
    "min_words": lambda t, c: len(t.split()) >= c["n"],
    "max_sentences": lambda t, c: len(_sentences(t)) <= c["n"],
    "min_sentences": lambda t, c: len(_sentences(t)) >= c["n"],
    "include_keyword": lambda t, c: c["word"].lower() in t.lower(),
    "no_commas": lambda t, c: "," not in t and "，" not in t,
    "lowercase": lambda t, c: t == t.lower() and bool(_LATIN.search(t)),
    "uppercase": lambda t, c: t == t.upper() and bool(_LATIN.search(t)),
    "json_format": lambda t, c: _is_json(t),
    "ends_with": lambda t, c: t.strip().endswith(c["phrase"]),
    "bullet_count": lambda t, c: len(re.findall(r"^\s*[*\-•]\s+\S", t, re.MULTILINE)) == c["n"],
    "language": lambda t, c: (bool(_HANGUL.search(t)) and not _LATIN.search(t)) if c["lang"] == "ko"
    else (bool(_LATIN.search(t)) and not _HANGUL.search(t)),
}


def check_constraint(response: str, c: dict) -> bool:
    if c.get("type") not in CONSTRAINTS:
        raise ValueError(f"constraint type {c.get('type')!r}: expected one of {sorted(CONSTRAINTS)}")
    return bool(CONSTRAINTS[c["type"]](response, c))


def correctness(response: str, task: dict) -> float:
    """Share of the task satisfied in [0, 1]: exact tasks 0/1, constraint tasks the share of
    constraints met."""
    if task["kind"] == "exact":
        return float(numeric_equal(extract_answer(response), str(task["answer"])))
    if task["kind"] == "ifeval":
        cs = task["constraints"]
        return sum(check_constraint(response, c) for c in cs) / len(cs)
    if task["kind"] == "tool_call":
        return tool_calls.call_correct(response, task)
    raise ValueError(f"task kind {task['kind']!r}: expected 'exact', 'ifeval' or 'tool_call'")


@dataclass
class RewardConfig:
    correct: float = 1.0      # paper 4.4: positive feedback for correctness...
    incorrect: float = -1.0   # ...and negative for errors; partial credit interpolates
    partial_credit: bool = True
    overlong_shaping: bool = True
    max_len: int = 128
    cache_len: int = 32


@dataclass
class Reward:
    total: float
    correct: float
    format: float
    overlong: float
    accuracy: float           # share of the task satisfied, in [0, 1]
    well_formed: bool
    reason: str = ""
    extra: dict = field(default_factory=dict)


def reward(completion: str, mode: str, task: dict, n_tokens: int, cfg: RewardConfig) -> Reward:
    """R = R_correct + R_format (+ DAPO's soft overlong term when enabled). A malformed output is
    graded on nothing: its answer cannot be located unambiguously, so R_correct = incorrect."""
    ok, why, _, response = split_response(completion, mode)
    acc = correctness(response, task) if ok else 0.0
    if not cfg.partial_credit:
        acc = float(acc == 1.0)
    r_correct = cfg.incorrect + (cfg.correct - cfg.incorrect) * acc
    r_format = 0.0 if ok else -1.0
    r_len = overlong_penalty(n_tokens, cfg.max_len, cfg.cache_len) if cfg.overlong_shaping else 0.0
    return Reward(r_correct + r_format + r_len, r_correct, r_format, r_len, acc, ok, why)


def group_by(items: Iterable, size: int) -> list[list]:
    items = list(items)
    return [items[i:i + size] for i in range(0, len(items), size)]
