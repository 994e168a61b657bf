"""Tool calls (issue 20): OpenAI-style records pass the schema, render through the kit's template
(and the exported one, in transformers), mask tool results, round-trip; bad ones are counted."""

import json

import pytest

import rl
import tokenizer as T
from kit import chat_data, tool_calls

TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "Evaluates arithmetic.",
                                           "parameters": {"type": "object",
                                                          "properties": {"expression": {"type": "string"}}}}}]


def tool_chat(reasoning: str | None = "I should use the tool.", content: str | None = None) -> dict:
    call = {"role": "assistant", "content": content,
            "tool_calls": [{"id": "call_1", "type": "function",
                            "function": {"name": "calculator", "arguments": "{\"expression\": \"12 * 7\"}"}}]}
    if reasoning is not None:
        call["reasoning_content"] = reasoning
    if content is None:
        del call["content"]
    final = {"role": "assistant", "content": "Answer: 84"}
    if reasoning is not None:
        final["reasoning_content"] = "The tool says 84."
    return {"tools": TOOLS, "messages": [{"role": "user", "content": "What is 12 * 7?"}, call,
                                         {"role": "tool", "tool_call_id": "call_1", "content": "84"}, final]}


@pytest.fixture(scope="module")
def tok():
    docs = ["What is 12 * 7? Answer: 84", "calculator expression tool_call tool_response", "바다"] * 20
    return T.to_transformers(T.train_tokenizer(docs, vocab_size=384, show_progress=False))


@pytest.mark.parametrize("reasoning, content", [("I should use the tool.", None), (None, None), (None, "Let me check."),
                                                ("plan", "Checking.")])
def test_tool_records_pass_the_schema_and_round_trip(tok, reasoning, content):
    rec = tool_chat(reasoning, content)
    assert chat_data.check_record(rec, "any") is None
    text = tok.apply_chat_template(rec["messages"], tools=rec["tools"], tokenize=False)
    messages, tools = tool_calls.parse_chat(text)
    assert tools == TOOLS and messages == tool_calls.normalized(rec["messages"])


def test_loss_covers_calls_and_answers_never_tool_results(tok):
    rec = tool_chat()
    ids, labels = chat_data.encode_chat(tok, rec["messages"], rec["tools"])
    trained = tok.decode([x for x in labels if x != chat_data.IGNORE_INDEX])
    call_text = "I should use the tool.</think><tool_call>{\"id\": \"call_1\", \"name\": \"calculator\", " \
                "\"arguments\": {\"expression\": \"12 * 7\"}}</tool_call><|eos|>"
    assert trained == call_text + "The tool says 84.</think>Answer: 84<|eos|>"
    masked = tok.decode([i for i, x in zip(ids, labels) if x == chat_data.IGNORE_INDEX])
    assert "<tool_response>" in masked and "<tools>" in masked and "What is 12 * 7?" in masked


@pytest.mark.parametrize("damage, reason", [
    (lambda r: r["messages"][2].update(tool_call_id="call_9"), "tool message answers an unknown tool_call_id"),
    (lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments="{\"expression\": "),
     "tool call arguments are not a JSON object"),
    (lambda r: r["messages"][1]["tool_calls"][0]["function"].update(name="search"),
     "tool call names a tool the record does not define"),
    (lambda r: r.update(tools=[{"name": "calculator"}]), "tools is not a list of {type: function, function: {name, ...}}"),
    (lambda r: r["messages"][3].update(content="<tool_call>{}</tool_call>"),
     "raw tool tag in content (use tools / tool_calls / tool messages)"),
])
def test_bad_tool_records_are_counted_with_file_and_line(tmp_path, damage, reason):
    bad = tool_chat()
    damage(bad)
    path = tmp_path / "tools.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (tool_chat(), bad, tool_chat())) + "\n")
    good, stats = chat_data.read_source(path, "any")
    assert len(good) == 2 and stats["bad"] == {reason: 1}
    assert stats["bad_examples"][0].startswith(f"{path}:2")


def test_exported_template_renders_the_same_text_in_transformers(tok, tmp_path):
    """What vLLM serves with: the saved tokenizer folder's template, loaded by AutoTokenizer."""
    from transformers import AutoTokenizer

    tok.save_pretrained(str(tmp_path))
    served = AutoTokenizer.from_pretrained(str(tmp_path))
    rec = tool_chat()
    for gen in (False, True):
        msgs = rec["messages"] if not gen else rec["messages"][:3]
        assert served.apply_chat_template(msgs, tools=rec["tools"], tokenize=False, add_generation_prompt=gen) == \
            tok.apply_chat_template(msgs, tools=rec["tools"], tokenize=False, add_generation_prompt=gen)


def test_calculator_task_records_and_verifier():
    tasks = chat_data.generate_tasks(12, 3, {"tool/en": 1, "tool/ko": 1}, heldout=False)
    for kind in ("sft_instruct", "sft_reasoning", "mod", "eval"):
        for rec in chat_data.build_dataset(kind, tasks):
            assert chat_data.check_record(rec, {"sft_instruct": "non_thinking", "sft_reasoning": "thinking",
                                                "mod": "any", "eval": None}[kind]) is None, rec
    task = tasks[0]["task"]
    a, op, b = tasks[0]["expression"].split()
    right = tool_calls.calculator(f"{a} {op} {b}")
    assert right == str({"*": int(a) * int(b), "+": int(a) + int(b), "-": int(a) - int(b)}[op]) == task["answer"]
    call = "<tool_call>{\"id\": \"c\", \"name\": \"calculator\", \"arguments\": {\"expression\": \"%s\"}}</tool_call>"
    cfg = rl.RewardConfig()
    assert rl.reward(call % tasks[0]["expression"], "non_thinking", task, 10, cfg).accuracy == 1.0
    assert rl.reward("plan</think>" + call % f"{right} + 0", "thinking", task, 10, cfg).accuracy == 1.0
    assert rl.reward(call % "1 + 1", "non_thinking", task, 10, cfg).accuracy == 0.0
    assert rl.reward(f"Answer: {right}", "non_thinking", task, 10, cfg).accuracy == 0.0  # no call: not tool use
    assert rl.reward("<tool_call>{\"id\": </tool_call>", "non_thinking", task, 10, cfg).accuracy == 0.0
    assert tool_calls.calculator("__import__('os')") is None and tool_calls.calculator("2 ** 99999") is None
