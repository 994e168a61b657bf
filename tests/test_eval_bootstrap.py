"""Sampled evaluation figures: bootstrap intervals, and smoke-report claims that hold only when
the paired interval of a difference excludes zero (issue 11, item 2)."""

import random

import pytest

from scripts import smoke_report as S
from stages.evaluate import bootstrap_ci


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_more_prompts():
    rng = random.Random(0)
    small = [rng.gauss(0.0, 1.0) for _ in range(30)]
    m, lo, hi = bootstrap_ci(small, 2000, 0)
    assert lo < m < hi and m == pytest.approx(sum(small) / 30)
    # the normal-theory half-width is 1.96 / sqrt(30) = 0.358 for unit variance
    assert 0.25 < (hi - lo) / 2 < 0.45
    big = [rng.gauss(0.0, 1.0) for _ in range(480)]
    _, lo2, hi2 = bootstrap_ci(big, 2000, 0)
    assert (hi2 - lo2) < (hi - lo) / 3


def test_paired_bootstrap_cancels_prompt_difficulty():
    rng = random.Random(1)
    difficulty = [rng.uniform(-2, 2) for _ in range(48)]        # varies a lot between prompts
    a = [d + 0.1 + rng.gauss(0, 0.02) for d in difficulty]       # a small, consistent gain
    m, lo, hi = bootstrap_ci(a, 2000, 0, baseline=difficulty)
    assert m == pytest.approx(0.1, abs=0.01) and lo > 0.08 and hi < 0.12
    _, lo_u, hi_u = bootstrap_ci(a, 2000, 0)  # unpaired, the same gain is lost in the spread
    assert hi_u - lo_u > 10 * (hi - lo)


def row(per_prompt_reward, malformed, nll):
    return {m: {"well_formed": 0.9, "reward": 0.0, "heldout_nll": nll, "sampled_n": 8, "sampled_temperature": 1.0,
                "sampled_per_prompt": {"reward": per_prompt_reward, "accuracy": [0.5] * len(per_prompt_reward),
                                       "malformed": malformed}}
            for m in ("thinking", "non_thinking")}


def claim(lines, text):
    hits = [x for x in lines if text in x]
    assert len(hits) == 1, lines
    return hits[0].startswith("- **holds**")


def test_rl_claims_need_the_interval_to_exclude_zero():
    rng = random.Random(2)
    base = [rng.uniform(-2, 0) for _ in range(48)]
    mod = row(base, [0.2] * 48, 1.0)
    better = row([b + 0.2 + rng.gauss(0, 0.05) for b in base], [0.2] * 48, 1.05)
    noisy = row([b + rng.gauss(0, 0.5) for b in base], [0.25] * 48, 1.2)   # no real gain
    lines = S.claims({"MOD": mod, "RL": better}, [])
    assert claim(lines, "sampled held-out reward is above MOD's")
    assert claim(lines, "no more frequent than MOD's") and claim(lines, "at most 10% above MOD's")
    lines = S.claims({"MOD": mod, "RL": noisy}, [])
    assert not claim(lines, "sampled held-out reward is above MOD's")
    assert not claim(lines, "no more frequent than MOD's") and not claim(lines, "at most 10% above MOD's")


def test_rl_gain_on_its_training_domain_is_read_apart_from_drift_elsewhere():
    # RL trains on instruction following only (paper 4.1): +0.4 there, -0.3 on math; overall ~0
    rng = random.Random(3)
    domains = ["Instruction Following"] * 20 + ["Math"] * 28
    base = [rng.uniform(-2, 0) for _ in domains]
    shifted = [b + (0.4 if d == "Instruction Following" else -0.3) + rng.gauss(0, 0.05) for b, d in zip(base, domains)]
    mod, rl_row = row(base, [0.2] * 48, 1.0), row(shifted, [0.2] * 48, 1.0)
    lines = S.claims({"MOD": mod, "RL": rl_row}, domains)
    assert not claim(lines, "sampled held-out reward is above MOD's")
    assert claim(lines, "on instruction-following prompts")
    table = S.rl_by_domain({"MOD": mod, "RL": rl_row}, domains)
    gains = {x.split(" | ")[0][2:]: float(x.split(" | ")[2].split()[0]) for x in table[2:]}
    assert gains["Instruction Following"] == pytest.approx(0.4, abs=0.05) and gains["Math"] == pytest.approx(-0.3, abs=0.05)
    assert not any("instruction-following" in x for x in S.claims({"MOD": mod, "RL": rl_row}, []))
