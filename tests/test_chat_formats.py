"""Public post-training formats (issue 20): a sample file per format, written here, reads to the
expected kit records through the configured `format`; malformed lines are counted with file:line."""

import json

import pytest
from omegaconf import OmegaConf

from kit import chat_data, chat_formats

THINKING = [{"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "Answer: 5", "reasoning_content": "2 + 3 = 5"}]
DIRECT = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "Answer: 5"}]
CALL = [{"role": "user", "content": "Use the calculator for 6 * 7."},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "calculator", "arguments": "{\"expression\": \"6 * 7\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        {"role": "assistant", "content": "Answer: 42"}]

SAMPLES = {  # format -> (rows, the messages each good row must read to)
    "nemotron": ([{"input": [{"role": "user", "content": "What is 2 + 3?"}], "output": "<think>2 + 3 = 5</think>Answer: 5",
                   "reasoning": "on", "system_prompt": "detailed thinking on", "category": "math"},
                  {"input": "What is 2 + 3?", "output": "Answer: 5", "reasoning": "off",
                   "system_prompt": "detailed thinking off"}],
                 [THINKING, DIRECT]),
    "sharegpt": ([{"conversations": [{"from": "human", "value": "What is 2 + 3?"},
                                     {"from": "gpt", "value": "<think>2 + 3 = 5</think>Answer: 5"}]},
                  {"conversations": [{"from": "human", "value": "Use the calculator for 6 * 7."},
                                     {"from": "function_call", "value": "{\"name\": \"calculator\", \"arguments\": "
                                                                        "{\"expression\": \"6 * 7\"}}"},
                                     {"from": "observation", "value": "42"},
                                     {"from": "gpt", "value": "Answer: 42"}]}],
                 [THINKING, CALL]),
    "openai": ([{"messages": [THINKING[0], {"role": "assistant", "content": "Answer: 5", "reasoning": "2 + 3 = 5"}]},
                {"messages": CALL}],
               [THINKING, CALL]),
}
MALFORMED = {"nemotron": {"input": "What is 2 + 3?", "output": "Answer: 5", "reasoning": "maybe"},
             "sharegpt": {"conversations": [{"from": "robot", "value": "hi"}]},
             "openai": {"messages": "not a list"}}
REASON = {"nemotron": "nemotron reasoning is not on/off",
          "sharegpt": "sharegpt turn from 'robot': expected system/human/gpt/function_call/observation",
          "openai": "openai row without a messages list"}


def sharegpt_call_ids(messages):
    """ShareGPT has no call ids: the reader makes one per call (call_<turn>); compare without it."""
    out = json.loads(json.dumps(messages))
    for m in out:
        for c in m.get("tool_calls") or []:
            c["id"] = "call_1"
        if m["role"] == "tool":
            m["tool_call_id"] = "call_1"
    return out


@pytest.mark.parametrize("fmt", sorted(SAMPLES))
def test_sample_file_reads_to_the_expected_records(tmp_path, fmt):
    rows, want = SAMPLES[fmt]
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text("\n".join([json.dumps(r) for r in rows] + ["{\"truncated\": ", json.dumps(MALFORMED[fmt])]) + "\n")
    good, stats = chat_data.read_source(path, "any", fmt)
    got = [r["messages"] for r in good]
    assert (got if fmt != "sharegpt" else [sharegpt_call_ids(m) for m in got]) == want
    assert sum(stats["bad"].values()) == 2 and stats["bad"][REASON[fmt]] == 1, stats
    assert [e.split(": ")[0] for e in stats["bad_examples"]] == [f"{path}:{len(rows) + 1}", f"{path}:{len(rows) + 2}"]


@pytest.mark.parametrize("container", ["parquet", "datasets"])
def test_nemotron_columnar_sample_reads_for_sft_and_rl(tmp_path, container):
    """Llama-Nemotron ships as parquet / HF datasets: the same rows, both as SFT records and as
    RL prompts (with an expected answer the exact verifier grades)."""
    import datasets

    rows = [{"input": [{"role": "user", "content": "What is 2 + 3?"}], "output": out, "reasoning": mode,
             "system_prompt": f"detailed thinking {mode}", "expected_answer": "5"}
            for out, mode in (("<think>2 + 3 = 5</think>Answer: 5", "on"), ("Answer: 5", "off"), ("Answer: 5", "on"))]
    table = datasets.Dataset.from_list(rows)
    path = tmp_path / ("nemotron.parquet" if container == "parquet" else "nemotron_ds")
    table.to_parquet(str(path)) if container == "parquet" else table.save_to_disk(str(path))
    good, stats = chat_data.read_source(path, "any", "nemotron")
    assert [r["messages"] for r in good] == [THINKING, DIRECT]
    assert stats["bad"] == {"nemotron reasoning=on output without a <think> block": 1}
    prompts, stats = chat_data.read_source(path, None, "nemotron")
    assert [r["messages"] for r in prompts] == [THINKING[:1]] * 3 and stats["bad"] == {}
    assert prompts[0]["task"] == {"kind": "exact", "answer": "5"}


def test_a_source_names_its_format_in_config(tmp_path):
    rows, want = SAMPLES["sharegpt"]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pd = OmegaConf.create({"name": "mine", "kind": "files", "seed": 0, "sources": {"sft_reasoning": [
        {"path": str(path), "format": "sharegpt", "lang": "en", "domain": "Math"}]}})
    records, report = chat_data.load_posttrain(pd, "sft_reasoning")
    assert [r["messages"] for r in records] == [THINKING]  # the tool chat ends without reasoning: counted
    assert report["bad"][str(path)] == {"thinking-mode record without reasoning_content": 1}
    with pytest.raises(ValueError, match="format 'alpaca'"):
        chat_formats.convert("alpaca", {}, prompt_only=False)
