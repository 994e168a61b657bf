"""Public post-training formats -> the kit's record schema (kit/chat_data.py), one row at a time.

A source in conf/posttrain_data/*.yaml names its `format`; the file type (.jsonl, .parquet, a
`datasets.save_to_disk` folder) is read as before (chat_data.read_rows). A row that cannot be
converted raises BadRow with the reason, which the reader counts with its file:line.

    kit / openai  {"messages": [...], "tools"?: [...]}: OpenAI chat messages, plus the kit's
                  `reasoning_content` (`reasoning` is accepted too; <think>...</think> at the start
                  of an assistant's content is split off into it)
    sharegpt      {"conversations": [{"from": system|human|user|gpt|assistant|function_call|
                  observation|tool, "value": str}], "system"?: str, "tools"?: [...] | JSON str}
    nemotron      Llama-Nemotron post-training records: {"input": str | [messages], "output": str,
                  "reasoning": "on"|"off", "system_prompt"?: str, "expected_answer"?: str}; the
                  "detailed thinking on/off" system prompt is Nemotron's mode switch, which the
                  kit's <think> / </think> tags replace, so it is dropped
"""

from __future__ import annotations

import json
import re

FORMATS = ("kit", "openai", "sharegpt", "nemotron")
_THINK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.S)
_NEMOTRON_SWITCH = re.compile(r"^\s*detailed thinking (on|off)\s*$", re.I)
_SHAREGPT_ROLE = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class BadRow(ValueError):
    """A row the format cannot convert: its message is the counted reason."""


def split_think(text: str) -> tuple[str | None, str]:
    """(reasoning, content) of a text that may open with <think>...</think>; reasoning None if it
    does not (an empty think block is a non-thinking answer)."""
    m = _THINK.match(text)
    if not m:
        return None, text
    reasoning = m.group(1).strip()
    return (reasoning or None), text[m.end():]


def _assistant(text: str) -> dict:
    reasoning, content = split_think(text)
    return {"role": "assistant", "content": content, **({"reasoning_content": reasoning} if reasoning else {})}


def from_openai(row: dict) -> dict:
    msgs = row.get("messages")
    if not isinstance(msgs, list):
        raise BadRow("openai row without a messages list")
    out = []
    for m in msgs:
        if not isinstance(m, dict):
            raise BadRow("message is not an object")
        m = {k: v for k, v in m.items() if v is not None}
        if "reasoning" in m and "reasoning_content" not in m:
            m["reasoning_content"] = m.pop("reasoning")
        if m.get("role") == "assistant" and isinstance(m.get("content"), str) and "reasoning_content" not in m:
            m = {**m, **_assistant(m["content"])}
        out.append(m)
    return {**row, "messages": out}


def from_sharegpt(row: dict) -> dict:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRow("sharegpt row without a conversations list")
    msgs = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) and row["system"] else []
    last_call = None
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str):
            raise BadRow("sharegpt turn without a string value")
        who = t.get("from")
        if who in _SHAREGPT_ROLE:
            role = _SHAREGPT_ROLE[who]
            msgs.append(_assistant(t["value"]) if role == "assistant" else {"role": role, "content": t["value"]})
        elif who == "function_call":
            try:
                call = json.loads(t["value"])
            except json.JSONDecodeError:
                raise BadRow("tool call arguments are not a JSON object") from None
            if not isinstance(call, dict) or "name" not in call:
                raise BadRow("sharegpt function_call without a name")
            last_call = f"call_{i}"
            args = call.get("arguments", {})
            msgs.append({"role": "assistant", "content": "", "tool_calls": [{
                "id": last_call, "type": "function",
                "function": {"name": call["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}}]})
        elif who in ("observation", "tool"):
            msgs.append({"role": "tool", "tool_call_id": last_call, "content": t["value"]})
        else:
            raise BadRow(f"sharegpt turn from {who!r}: expected system/human/gpt/function_call/observation")
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError:
            raise BadRow("sharegpt tools is not JSON") from None
    if isinstance(tools, list) and tools and "type" not in tools[0]:  # bare function schemas
        tools = [{"type": "function", "function": f} for f in tools]
    out = {k: v for k, v in row.items() if k not in ("conversations", "system", "tools")}
    return {**out, "messages": msgs, **({"tools": tools} if tools else {})}


def from_nemotron(row: dict, prompt_only: bool) -> dict:
    raw = row.get("input")
    if isinstance(raw, str):
        msgs = [{"role": "user", "content": raw}]
    elif isinstance(raw, list) and all(isinstance(m, dict) for m in raw):
        msgs = [{k: v for k, v in m.items() if v is not None} for m in raw]
    else:
        raise BadRow("nemotron row without an input string or message list")
    system = row.get("system_prompt")
    if isinstance(system, str) and system.strip() and not _NEMOTRON_SWITCH.match(system):
        msgs = [{"role": "system", "content": system}] + msgs
    msgs = [m for m in msgs if not (m.get("role") == "system" and _NEMOTRON_SWITCH.match(str(m.get("content"))))]
    rec = {k: v for k, v in row.items() if k in ("id", "uuid", "category", "lang")}
    if "category" in rec:
        rec["domain"] = rec.pop("category")
    if isinstance(row.get("expected_answer"), str) and row["expected_answer"].strip():
        rec["task"] = {"kind": "exact", "answer": row["expected_answer"].strip()}
    if prompt_only:
        return {**rec, "messages": msgs}
    if row.get("reasoning") not in ("on", "off"):
        raise BadRow("nemotron reasoning is not on/off")
    if not isinstance(row.get("output"), str):
        raise BadRow("nemotron row without an output string")
    answer = _assistant(row["output"])
    if row["reasoning"] == "off":
        answer.pop("reasoning_content", None)
    elif "reasoning_content" not in answer:
        raise BadRow("nemotron reasoning=on output without a <think> block")
    return {**rec, "messages": msgs + [answer]}


def convert(fmt: str, row, prompt_only: bool) -> dict:
    """The kit record of one row of `fmt`; prompt_only: an RL / evaluation prompt (no answer)."""
    if not isinstance(row, dict):
        raise BadRow("record is not an object")
    if fmt == "kit":
        return row
    if fmt == "openai":
        return from_openai(row)
    if fmt == "sharegpt":
        return from_sharegpt(row)
    if fmt == "nemotron":
        return from_nemotron(row, prompt_only)
    raise ValueError(f"format {fmt!r}: expected one of {FORMATS}")
