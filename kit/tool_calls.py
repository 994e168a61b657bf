"""Tool calls in chat records (paper Table 3's Tool-use share, 4.2): OpenAI-style fields, their
checks, the text the kit's chat template renders them as, and that text parsed back.

Record fields (OpenAI's chat format, which vLLM and transformers' chat templates take as is):
    "tools": [{"type": "function", "function": {"name", "description"?, "parameters"?}}, ...]
    assistant: {"role": "assistant", "content"?: str, "reasoning_content"?: str,
                "tool_calls": [{"id": str, "type": "function",
                                "function": {"name": str, "arguments": "<JSON object>" | {...}}}]}
    tool:      {"role": "tool", "tool_call_id": <an earlier call's id>, "content": str}

Rendered (tokenizer.CHAT_TEMPLATE) with no new special tokens, in the Hermes-style tags vLLM's
`hermes` tool parser reads: the tools as a system turn `<tools>` one JSON per line `</tools>`,
each call as `<tool_call>{"id", "name", "arguments"}</tool_call>` after the assistant's content,
each result as a user turn `<tool_response>{"tool_call_id", "content"}</tool_response>`. The SFT
loss covers assistant turns (their calls included), never tool results (chat_data.encode_chat).
"""

from __future__ import annotations

import ast
import json
import operator
import re

TOOLS_OPEN, TOOLS_CLOSE = "<tools>", "</tools>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESULT_OPEN, RESULT_CLOSE = "<tool_response>", "</tool_response>"
TAGS = (TOOLS_OPEN, TOOLS_CLOSE, CALL_OPEN, CALL_CLOSE, RESULT_OPEN, RESULT_CLOSE)


def arguments_of(call: dict) -> dict | None:
    """A call's arguments as a dict (OpenAI sends a JSON string; some writers a dict), or None."""
    args = (call.get("function") or {}).get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return args if isinstance(args, dict) else None


def check_tools(tools) -> str | None:
    """The reason a record's `tools` list is unusable, or None."""
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) and t["function"]["name"] for t in tools):
        return "tools is not a list of {type: function, function: {name, ...}}"
    return None


def check_messages(msgs: list[dict], tools) -> str | None:
    """Tool fields of a record's messages: calls well-formed, every result answering an earlier
    call by id (each at most once). Returns the first reason, or None."""
    names = {t["function"]["name"] for t in tools} if tools else None
    open_calls: set[str] = set()
    for m in msgs:
        calls = m.get("tool_calls")
        if calls is not None:
            if m["role"] != "assistant" or not isinstance(calls, list) or not calls:
                return "tool_calls is not a non-empty list on an assistant message"
            for call in calls:
                if not (isinstance(call, dict) and isinstance(call.get("id"), str) and call["id"]
                        and isinstance(call.get("function"), dict) and isinstance(call["function"].get("name"), str)):
                    return "tool call without id or function name"
                if arguments_of(call) is None:
                    return "tool call arguments are not a JSON object"
                if names is not None and call["function"]["name"] not in names:
                    return "tool call names a tool the record does not define"
                open_calls.add(call["id"])
        if m["role"] == "tool":
            if m.get("tool_call_id") not in open_calls:
                return "tool message answers an unknown tool_call_id"
            open_calls.discard(m["tool_call_id"])
        for text in (m.get("content"), m.get("reasoning_content")):
            if isinstance(text, str) and any(tag in text for tag in TAGS):
                return "raw tool tag in content (use tools / tool_calls / tool messages)"
    return None


# ----------------------------------------------------------------------------------------
# Rendered text -> messages (the round trip the tests check; also reads model outputs)
# ----------------------------------------------------------------------------------------
_TURN = re.compile(r"<\|(system|user|assistant)\|>(.*?)<\|eos\|>", re.S)
_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.S)


def parse_calls(text: str) -> tuple[str, list[dict]]:
    """(content before the first call, calls) of an assistant turn's response text."""
    head, _, _ = text.partition(CALL_OPEN)
    calls = []
    for raw in _CALL.findall(text):
        call = json.loads(raw)
        calls.append({"id": call["id"], "type": "function",
                      "function": {"name": call["name"], "arguments": call["arguments"]}})
    return head, calls


def parse_chat(text: str, think: str = "<think>", end_think: str = "</think>") -> tuple[list[dict], list | None]:
    """(messages, tools) of a chat rendered by the kit's template: tool arguments come back as
    dicts (compare with `normalized`)."""
    messages, tools = [], None
    for role, body in _TURN.findall(text):
        if role == "system" and body.startswith(TOOLS_OPEN) and body.endswith(TOOLS_CLOSE) and tools is None:
            lines = body[len(TOOLS_OPEN):-len(TOOLS_CLOSE)].strip("\n").split("\n")
            tools = [json.loads(line) for line in lines if line]
        elif role == "user" and body.startswith(RESULT_OPEN) and body.endswith(RESULT_CLOSE):
            result = json.loads(body[len(RESULT_OPEN):-len(RESULT_CLOSE)])
            messages.append({"role": "tool", "tool_call_id": result["tool_call_id"], "content": result["content"]})
        elif role == "assistant":
            msg = {"role": "assistant"}
            if body.startswith(think):
                msg["reasoning_content"], _, body = body[len(think):].partition(end_think)
            else:
                body = body[len(end_think):]
            content, calls = parse_calls(body)
            msg["content"] = content
            if calls:
                msg["tool_calls"] = calls
            messages.append(msg)
        else:
            messages.append({"role": role, "content": body})
    return messages, tools


def normalized(messages: list[dict]) -> list[dict]:
    """Messages as parse_chat returns them: arguments as dicts, content always a string."""
    out = []
    for m in messages:
        m = dict(m)
        if m["role"] == "assistant":
            m["content"] = m.get("content") or ""
        if m.get("tool_calls"):
            m["tool_calls"] = [{"id": c["id"], "type": "function",
                                "function": {"name": c["function"]["name"], "arguments": arguments_of(c)}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


# ----------------------------------------------------------------------------------------
# The smoke's tool: a calculator, and the verifier of a call to it (rl.correctness, kind tool_call)
# ----------------------------------------------------------------------------------------
CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Integer arithmetic: + - *",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def calculator(expression: str) -> str | None:
    """The tool's result (integers, + - *), or None for anything else: never Python's eval."""
    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(type(node).__name__)
    try:
        return str(value(ast.parse(expression, mode="eval").body)) if len(expression) < 200 else None
    except (SyntaxError, ValueError, TypeError):
        return None


def call_correct(response: str, task: dict) -> float:
    """1.0 when the response's first tool call names the task's tool and, run, gives its answer."""
    try:
        _, calls = parse_calls(response)
    except (json.JSONDecodeError, KeyError, TypeError):
        return 0.0
    if not calls or calls[0]["function"]["name"] != task["tool"] or not isinstance(calls[0]["function"]["arguments"], dict):
        return 0.0
    expression = calls[0]["function"]["arguments"].get("expression")
    return float(isinstance(expression, str) and calculator(expression) == str(task["answer"]))
