"""rl.py against hand-computed values (numbers worked out in the comments)."""

import itertools
import math

import pytest
import torch

import rl

# Two sequences, old policy log-probs 0 everywhere.
#   row 0: new = [0.1, 0.2, 0.3], 3 tokens -> mean 0.2   -> s0 = exp(0.2)   = 1.2214027582
#   row 1: new = [-0.3, -0.6, (9.0 padded)], 2 tokens -> mean -0.45 -> s1 = exp(-0.45) = 0.6376281516
LOGP_NEW = [[0.1, 0.2, 0.3], [-0.3, -0.6, 9.0]]
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
ADV = torch.tensor([1.0, -1.0])


def _new():
    return torch.tensor(LOGP_NEW, dtype=torch.float64, requires_grad=True)


def test_sequence_ratio_is_length_normalised():
    lr = rl.sequence_log_ratio(_new(), torch.zeros(2, 3, dtype=torch.float64), MASK)
    assert lr.tolist() == pytest.approx([0.2, -0.45])


def test_gspo_symmetric_clip():
    # eps 0.2/0.2: s0 = 1.2214 > 1.2 with A>0 -> J0 = 1.2 ; s1 = 0.6376 < 0.8 with A<0 -> J1 = min(-0.6376, -0.8) = -0.8
    # seq-mean loss = -(1.2 - 0.8) / 2 = -0.2 ; both clipped -> zero gradient
    x = _new()
    loss, st = rl.gspo_loss(x, torch.zeros(2, 3, dtype=torch.float64), MASK, ADV.double(), 0.2, 0.2)
    assert loss.item() == pytest.approx(-0.2)
    assert st["clip_frac"] == 1.0
    assert st["ratio_mean"] == pytest.approx((1.2214027582 + 0.6376281516) / 2)
    loss.backward()
    assert torch.count_nonzero(x.grad) == 0


def test_gspo_clip_higher_and_gradient():
    # eps_high 0.28: s0 = 1.2214 < 1.28 is not clipped -> J0 = 1.2214027582, J1 = -0.8
    # seq-mean loss = -(1.2214027582 - 0.8) / 2 = -0.2107013791
    # d loss / d logp_new[0, t] = -(1/2) * s0 * A0 * (1/3) = -0.2035671264 for the 3 real tokens
    x = _new()
    loss, st = rl.gspo_loss(x, torch.zeros(2, 3, dtype=torch.float64), MASK, ADV.double(), 0.2, 0.28)
    assert loss.item() == pytest.approx(-0.2107013791)
    assert st["clip_frac"] == 0.5
    loss.backward()
    assert x.grad[0].tolist() == pytest.approx([-0.2035671264] * 3)
    assert x.grad[1].tolist() == pytest.approx([0.0, 0.0, 0.0])


def test_gspo_token_mean_weights_by_length():
    # token-mean: -(3 * 1.2 + 2 * (-0.8)) / 5 = -0.4
    loss, _ = rl.gspo_loss(_new(), torch.zeros(2, 3, dtype=torch.float64), MASK, ADV.double(), 0.2, 0.2,
                           aggregation="token-mean")
    assert loss.item() == pytest.approx(-0.4)
    with pytest.raises(ValueError, match="rl.aggregation='sum'"):
        rl.gspo_loss(_new(), torch.zeros(2, 3), MASK, ADV, 0.2, 0.2, aggregation="sum")


def test_gspo_masked_sequence_is_ignored():
    # overlong filtering zeroes row 1's mask: only J0 = 1.2 remains in either mean
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    for agg in ("seq-mean", "token-mean"):
        loss, _ = rl.gspo_loss(_new(), torch.zeros(2, 3, dtype=torch.float64), mask, ADV.double(), 0.2, 0.2, agg)
        assert loss.item() == pytest.approx(-1.2)


def test_group_advantages():
    # group [1,0,0,1]: mean 0.5, population std 0.5 -> (r - 0.5) / (0.5 + 1e-6) = +-0.999998
    # group [2,2,2,2]: std 0 -> all 0
    adv = rl.group_advantages(torch.tensor([1.0, 0, 0, 1, 2, 2, 2, 2], dtype=torch.float64), 4)
    a = 0.5 / (0.5 + 1e-6)
    assert adv.tolist() == pytest.approx([a, -a, -a, a, 0, 0, 0, 0])
    # group [3,1,2]: mean 2, std sqrt(2/3) = 0.8164965809 -> [1/0.8164975809, -..., 0] = +-1.2247433
    adv = rl.group_advantages(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64), 3)
    assert adv.tolist() == pytest.approx([1.2247433, -1.2247433, 0.0], abs=1e-6)


def test_informative_groups():
    r = torch.tensor([1.0, 1, 1, 0.5, 0.5, 0.5, -2, 0, 1])
    assert rl.informative_groups(r, 3).tolist() == [False, False, True]


def test_overlong_penalty():
    # max 20, cache 4: free up to 16, then (16 - L) / 4, -1 beyond 20
    assert [rl.overlong_penalty(n, 20, 4) for n in (10, 16, 17, 18, 20, 25)] == [0, 0, -0.25, -0.5, -1, -1]


def test_collect_groups_drops_and_refills():
    prompts = iter([{"r": [1, 1]}, {"r": [0, 1]}, {"r": [2, 2]}, {"r": [1, 3]}, {"r": [5, 6]}])
    rounds = []

    def sample(batch):
        rounds.append(len(batch))
        return [p["r"] for p in batch]
    # round 1 draws 2 prompts: [1,1] dropped, [0,1] kept; round 2 draws 1: [2,2] dropped; round 3: [1,3] kept
    kept, st = rl.collect_groups(sample, prompts, lambda g: g, n_groups=2, max_prompts=10)
    assert kept == [[0, 1], [1, 3]] and rounds == [2, 1, 1]
    assert st == {"prompts_tried": 4, "groups_dropped": 2, "groups_kept": 2}
    same = lambda batch: [[1, 1] for _ in batch]  # noqa: E731
    kept, st = rl.collect_groups(same, itertools.repeat(None), lambda g: g, n_groups=2, max_prompts=3)
    assert kept == [] and st["prompts_tried"] == 3
    kept, _ = rl.collect_groups(same, itertools.repeat(None), lambda g: g, 2, 3, dynamic=False)
    assert len(kept) == 2
    # over-sampling the first round: 4 prompts drawn at once, 3 informative, only 2 kept
    rounds.clear()
    four = iter([{"r": [0, 1]}, {"r": [1, 1]}, {"r": [2, 3]}, {"r": [4, 5]}])
    kept, st = rl.collect_groups(sample, four, lambda g: g, n_groups=2, max_prompts=10, first_round=4)
    assert kept == [[0, 1], [2, 3]] and rounds == [4] and st["groups_dropped"] == 1


@pytest.mark.parametrize("completion, mode, reason", [
    ("7 + 5 = 12</think>12", "thinking", ""),
    ("12", "thinking", "unclosed <think>"),
    ("<think>a</think>12", "thinking", "duplicated <think>"),
    ("a</think>b</think>12", "thinking", "duplicated </think>"),
    ("a</think>12<think>", "thinking", "duplicated <think>"),
    ("a</think>  ", "thinking", "empty response after </think>"),
    ("</think>12", "thinking", "empty reasoning"),
    ("12", "non_thinking", ""),
    ("<think>a</think>12", "non_thinking", "think tag in non-thinking output"),
    ("a</think>12", "non_thinking", "think tag in non-thinking output"),
    ("12<think>", "non_thinking", "think tag in non-thinking output"),
    (" ", "non_thinking", "empty response"),
])
def test_format_reward_planted(completion, mode, reason):
    ok, why, _, _ = rl.split_response(completion, mode)
    assert why == reason
    assert rl.format_reward(completion, mode) == (0.0 if reason == "" else -1.0)


def test_mode_obeyed():
    assert rl.mode_obeyed("r</think>a", "thinking") and not rl.mode_obeyed("a", "thinking")
    assert rl.mode_obeyed("r</think>", "thinking")  # obeyed (it thought) but malformed (no response)
    assert rl.mode_obeyed("a", "non_thinking") and not rl.mode_obeyed("r</think>a", "non_thinking")


def test_extract_and_compare():
    assert rl.extract_answer("so 12 + 30 = 42. Answer: 1,234") == "1234"
    assert rl.extract_answer("계산하면 정답: -56") == "-56"
    assert rl.extract_answer("it is 7 then 9") == "9"
    assert rl.extract_answer("no digits") is None
    assert rl.numeric_equal("42.0", "42") and not rl.numeric_equal("41", "42") and not rl.numeric_equal(None, "1")


@pytest.mark.parametrize("c, good, bad", [
    ({"type": "max_words", "n": 3}, "one two three", "one two three four"),
    ({"type": "min_words", "n": 3}, "one two three", "one two"),
    ({"type": "max_sentences", "n": 1}, "One sentence here.", "One. Two."),
    ({"type": "min_sentences", "n": 2}, "One. Two!", "Only one."),
    ({"type": "include_keyword", "word": "apple"}, "I like Apple pie", "I like pears"),
    ({"type": "no_commas"}, "a b c", "a, b"),
    ({"type": "lowercase"}, "all lower here", "Not lower"),
    ({"type": "uppercase"}, "ALL UPPER", "ALL uPPER"),
    ({"type": "json_format"}, '{"a": 1}', "{a: 1}"),
    ({"type": "json_format"}, '```json\n[1, 2]\n```', "plain"),
    ({"type": "ends_with", "phrase": "Is there anything else?"}, "Done. Is there anything else?", "Is there anything else? Done."),
    ({"type": "bullet_count", "n": 2}, "* a\n* b", "* a\n* b\n- c"),
    ({"type": "language", "lang": "ko"}, "안녕하세요 123", "안녕 hello"),
    ({"type": "language", "lang": "en"}, "hello there", "hello 안녕"),
])
def test_verifiers(c, good, bad):
    assert rl.check_constraint(good, c)
    assert not rl.check_constraint(bad, c)


def test_unknown_constraint_is_one_line():
    with pytest.raises(ValueError, match="constraint type 'rhyme'"):
        rl.check_constraint("x", {"type": "rhyme"})


def test_reward_components():
    cfg = rl.RewardConfig(max_len=20, cache_len=4)
    task = {"kind": "exact", "answer": "42"}
    good = rl.reward("6*7=42</think>Answer: 42", "thinking", task, 10, cfg)
    assert (good.total, good.correct, good.format) == (1.0, 1.0, 0.0)
    wrong = rl.reward("6*7=41</think>41", "thinking", task, 18, cfg)  # -1 incorrect, -0.5 overlong
    assert wrong.total == pytest.approx(-1.5)
    bad = rl.reward("<think>x</think>42", "thinking", task, 10, cfg)  # malformed: -1 format, graded incorrect
    assert (bad.total, bad.format, bad.reason) == (-2.0, -1.0, "duplicated <think>")
    half = rl.reward("hello, world", "non_thinking",
                     {"kind": "ifeval", "constraints": [{"type": "no_commas"}, {"type": "lowercase"}]}, 5, cfg)
    assert half.correct == 0.0 and half.accuracy == 0.5  # -1 + 2 * 0.5
    strict = rl.reward("hello, world", "non_thinking",
                       {"kind": "ifeval", "constraints": [{"type": "no_commas"}, {"type": "lowercase"}]}, 5,
                       rl.RewardConfig(partial_credit=False, overlong_shaping=False))
    assert strict.correct == -1.0
    assert math.isclose(rl.reward("x", "non_thinking", task, 30, cfg).overlong, -1.0)
