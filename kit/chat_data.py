"""Post-training data (paper 4.2-4.4): a seeded generator of verifiable English/Korean tasks for
CPU runs, readers for real chat datasets, and the SFT tokenisation with prompt masking.

Record schema (what every reader returns and every stage consumes), one chat per record:
    {"id": str, "lang": "en"|"ko", "domain": str,
     "messages": [{"role": "user", "content": str}, ...,
                  {"role": "assistant", "content": response, "reasoning_content": trace?}],
     "task": {"kind": "exact", "answer": "632"} | {"kind": "ifeval", "constraints": [...]} | absent}
`reasoning_content` present = a thinking-mode turn (<think>{trace}</think>{response}); absent = a
non-thinking turn (</think>{response}); the tokenizer's chat template renders both (SPEC 4).
`task` is what rl.py's verifiers grade; RL and evaluation prompts must carry it.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import data
import rl
from kit import chat_formats, tool_calls

IGNORE_INDEX = -100
_ROLES = {"system", "user", "assistant", "tool"}

# ----------------------------------------------------------------------------------------
# Generator: arithmetic (exact answers) and IFEval-style formatting tasks, en + ko
# ----------------------------------------------------------------------------------------
_OPS = {"add": "+", "sub": "-", "mul": "*"}
_ASK = {"en": ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}."],
        "ko": ["{a} {op} {b}는 얼마인가요?", "{a} {op} {b}를 계산하세요.", "{a} {op} {b}의 값을 구하세요."]}
_PLACE = {"en": ["ones", "tens", "hundreds", "thousands", "ten-thousands"], "ko": ["일의 자리", "십의 자리", "백의 자리", "천의 자리", "만의 자리"]}
_ANSWER = {"en": "Answer: {x}", "ko": "정답: {x}"}


def _digits(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]


def arithmetic_trace(a: int, b: int, op: str, lang: str) -> str:
    """Column-by-column steps a tiny model can imitate (carries and borrows spelled out)."""
    place, steps = _PLACE[lang], []
    if op == "add":
        da, db, carry = _digits(a), _digits(b), 0
        for i in range(max(len(da), len(db))):
            x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
            s = x + y + carry
            expr = f"{x} + {y}" + (f" + {carry}" if carry else "")
            steps.append(f"{place[i]} {expr} = {s}" + (f", carry {s // 10}" if s >= 10 and lang == "en" else
                                                      f", {s // 10} 올림" if s >= 10 else ""))
            carry = s // 10
    elif op == "sub":
        da, db, borrow = _digits(a), _digits(b), 0
        for i in range(len(da)):
            x, y = da[i] - borrow, (db[i] if i < len(db) else 0)
            borrow = int(x < y)
            steps.append(f"{place[i]} {x + 10 * borrow} - {y} = {x + 10 * borrow - y}"
                         + ((", borrow 1" if lang == "en" else ", 1 빌림") if borrow else ""))
    else:  # 2-3 digit times a multiplier split into tens + ones: partial products
        tens, ones = b - b % 10, b % 10
        parts = [f"{a} * {tens} = {a * tens}"] if tens else []
        parts.append(f"{a} * {ones} = {a * ones}")
        steps = parts + ([f"{a * tens} + {a * ones} = {a * b}"] if tens else [])
    result = {"add": a + b, "sub": a - b, "mul": a * b}[op]
    return "; ".join(steps) + (f". So {a} {_OPS[op]} {b} = {result}." if lang == "en" else f". 따라서 {a} {_OPS[op]} {b} = {result}.")


def arithmetic_task(rng: random.Random, lang: str) -> dict:
    op = rng.choice(list(_OPS))
    # sizes keep traces under ~60 tokens: long digit runs are where a tiny model starts looping
    if op == "mul":
        a, b = rng.randint(12, 99), rng.randint(2, 9)
    else:
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        if op == "sub" and b > a:
            a, b = b, a
    x = {"add": a + b, "sub": a - b, "mul": a * b}[op]
    prompt = rng.choice(_ASK[lang]).format(a=a, op=_OPS[op], b=b)
    return {"lang": lang, "domain": "Math", "prompt": prompt, "task": {"kind": "exact", "answer": str(x)},
            "direct": f"{a} {_OPS[op]} {b} = {x}", "trace": arithmetic_trace(a, b, op, lang),
            "final": _ANSWER[lang].format(x=x)}


# Topic banks: short comma-free sentences, so every constraint below can be met by construction.
_TOPICS = {
    "en": {"the sea": ["The sea is wide and deep", "Waves move with the wind", "Many fish live in the sea"],
           "coffee": ["Coffee is made from roasted beans", "Many people drink coffee in the morning", "Coffee can keep you awake"],
           "trees": ["Trees make oxygen", "Old trees can be very tall", "Birds build nests in trees"],
           "the moon": ["The moon circles the earth", "The moon has no air", "The moon changes shape each night"],
           "music": ["Music can change your mood", "Some songs are very old", "People play music together"],
           "rain": ["Rain falls from clouds", "Plants need rain to grow", "Rain makes the streets wet"],
           "books": ["Books hold many stories", "Reading books builds vocabulary", "A library lends books"],
           "cats": ["Cats sleep for many hours", "A cat can see in dim light", "Cats like warm places"]},
    "ko": {"바다": ["바다는 넓고 깊습니다", "파도는 바람을 따라 움직입니다", "바다에는 많은 물고기가 삽니다"],
           "커피": ["커피는 볶은 원두로 만듭니다", "많은 사람이 아침에 커피를 마십니다", "커피는 잠을 깨워 줍니다"],
           "나무": ["나무는 산소를 만듭니다", "오래된 나무는 매우 높습니다", "새는 나무에 둥지를 짓습니다"],
           "달": ["달은 지구 주위를 돕니다", "달에는 공기가 없습니다", "달은 밤마다 모양이 바뀝니다"],
           "음악": ["음악은 기분을 바꿀 수 있습니다", "어떤 노래는 아주 오래되었습니다", "사람들은 함께 음악을 연주합니다"],
           "비": ["비는 구름에서 내립니다", "식물은 자라려면 비가 필요합니다", "비가 오면 거리가 젖습니다"],
           "책": ["책에는 많은 이야기가 있습니다", "책을 읽으면 어휘가 늘어납니다", "도서관은 책을 빌려 줍니다"],
           "고양이": ["고양이는 오래 잠을 잡니다", "고양이는 어두운 곳에서도 봅니다", "고양이는 따뜻한 곳을 좋아합니다"]},
}
_ENDING = {"en": "Is there anything else?", "ko": "더 궁금한 점이 있나요?"}
_WRITE = {"en": "Write about {t}.", "ko": "{t}에 대해 써 주세요."}
_INSTR = {  # constraint -> (en instruction, ko instruction)
    "lowercase": ("Use only lowercase letters.", None),
    "uppercase": ("Use only uppercase letters.", None),
    "no_commas": ("Do not use any commas.", "쉼표를 사용하지 마세요."),
    "include_keyword": ("Include the word \"{word}\".", "\"{word}\"라는 단어를 포함하세요."),
    "ends_with": ("End your answer with \"{phrase}\"", "답변을 \"{phrase}\"로 끝내세요."),
    "bullet_count": ("Use exactly {n} bullet points.", "정확히 {n}개의 글머리 기호를 사용하세요."),
    "json_format": ("Answer in JSON format.", "JSON 형식으로 답하세요."),
    "max_words": ("Answer in at most {n} words.", "{n}단어 이하로 답하세요."),
    "max_sentences": ("Answer in at most {n} sentences.", "{n}문장 이하로 답하세요."),
    "language": ("Answer in {name} only.", "{name}로만 답하세요."),
}
_LANG_NAME = {"en": {"en": "English", "ko": "Korean"}, "ko": {"en": "영어", "ko": "한국어"}}


def instruction_task(rng: random.Random, lang: str) -> dict:
    """One or two IFEval-style constraints on a short text about a topic; the response is built
    to satisfy them (checked with rl.py's verifiers) and the trace states the plan (thinking mode)."""
    ti = rng.randrange(len(_TOPICS["en"]))
    topic = list(_TOPICS[lang])[ti]
    first = rng.choice([k for k, v in _INSTR.items() if v[lang == "ko"] is not None])
    picked = [first]
    if first != "json_format" and rng.random() < 0.5:
        picked.append(rng.choice(sorted({"no_commas", "include_keyword", "ends_with"} - {first})))
    out_lang = rng.choice(["en", "ko"]) if first == "language" else lang
    body = list(_TOPICS[out_lang].values())[ti][:rng.randint(1, 3)]
    if first == "max_words":
        body = body[:1]
    ending = _ENDING[out_lang].lower() if first == "lowercase" else _ENDING[out_lang].upper() if first == "uppercase" \
        else _ENDING[out_lang]
    if first == "bullet_count":
        text = "\n".join(f"* {s}" for s in body)
    elif first == "json_format":
        text = json.dumps({"topic": list(_TOPICS[out_lang])[ti], "points": body}, ensure_ascii=False)
    else:
        text = ". ".join(body) + "."
    text = text.lower() if first == "lowercase" else text.upper() if first == "uppercase" else text
    if "ends_with" in picked:
        text = f"{text} {ending}"
    cons = []
    for k in picked:  # parameters read off the final text, so the response meets them by construction
        c = {"type": k}
        if k == "include_keyword":
            c["word"] = rng.choice([w for s in body for w in s.split() if len(w) > 3] or body[0].split())
        elif k == "ends_with":
            c["phrase"] = ending
        elif k == "bullet_count":
            c["n"] = len(body)
        elif k == "max_sentences":
            c["n"] = len(rl._sentences(text))
        elif k == "max_words":
            c["n"] = len(text.split()) + rng.randint(0, 3)
        elif k == "language":
            c["lang"] = out_lang
        cons.append(c)
    bad = [c["type"] for c in cons if not rl.check_constraint(text, c)]
    if bad:
        raise AssertionError(f"instruction_task built a response that fails {bad}: {text!r}")
    instr = " ".join(_INSTR[c["type"]][lang == "ko"].format(
        word=c.get("word", ""), phrase=c.get("phrase", ""), n=c.get("n", ""),
        name=_LANG_NAME[lang].get(c.get("lang", ""), "")) for c in cons)
    names = ", ".join(c["type"] for c in cons)
    trace = (f"Rules: {names}. Points: {len(body)}." if lang == "en" else f"규칙: {names}. 내용: {len(body)}개.")
    return {"lang": lang, "domain": "Instruction Following", "prompt": _WRITE[lang].format(t=topic) + " " + instr,
            "task": {"kind": "ifeval", "constraints": cons}, "direct": text, "trace": trace, "final": text}


_USE_TOOL = {"en": "Use the calculator to compute {e}.", "ko": "계산기를 사용해 {e}를 계산하세요."}
_TOOL_PLAN = {"en": "Call the calculator.", "ko": "계산기를 씁니다."}
_TOOL_SAYS = {"en": "The calculator returned {x}.", "ko": "계산기 결과는 {x}입니다."}


def tool_task(rng: random.Random, lang: str) -> dict:
    """A calculator call (Table 3's Tool-use domain): the trajectory is call -> result -> answer;
    the verifier (rl.correctness, kind tool_call) runs the model's call and checks the result."""
    a, b, op = rng.randint(100, 999), rng.randint(10, 99), rng.choice(["*", "+", "-"])
    expression = f"{a} {op} {b}"
    x = tool_calls.calculator(expression)
    return {"lang": lang, "domain": "Tool-use", "prompt": _USE_TOOL[lang].format(e=expression),
            "task": {"kind": "tool_call", "tool": "calculator", "answer": x}, "tools": [tool_calls.CALCULATOR],
            "expression": expression, "direct": _ANSWER[lang].format(x=x), "final": _ANSWER[lang].format(x=x),
            "trace": _TOOL_SAYS[lang].format(x=x)}


def _tool_turns(t: dict, mode: str) -> list[dict]:
    """The assistant's call, the tool's result and the final answer of a tool task. One call per
    chat, so one short id (an id is unique within its chat, as in OpenAI's API): every token counts
    in the tiny model's 256-token SFT sequences."""
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "calculator", "arguments": json.dumps({"expression": t["expression"]})}}]}
    final = {"role": "assistant", "content": t["final"]}
    if mode == "thinking":
        call["reasoning_content"] = _TOOL_PLAN[t["lang"]].format(e=t["expression"])
        final["reasoning_content"] = t["trace"]
    return [call, {"role": "tool", "tool_call_id": "call_1", "content": t["task"]["answer"]}, final]


def _record(t: dict, mode: str, idx: str) -> dict:
    if "tools" in t:
        return {"id": idx, "lang": t["lang"], "domain": t["domain"], "task": t["task"], "tools": t["tools"],
                "messages": [{"role": "user", "content": t["prompt"]}] + _tool_turns(t, mode)}
    asst = {"role": "assistant", "content": t["direct"] if mode == "non_thinking" else t["final"]}
    if mode == "thinking":
        asst["reasoning_content"] = t["trace"]
    return {"id": idx, "lang": t["lang"], "domain": t["domain"], "task": t["task"],
            "messages": [{"role": "user", "content": t["prompt"]}, asst]}


def is_heldout(prompt: str, every: int) -> bool:
    """Deterministic split by prompt text: an eval prompt never appears in any training set."""
    return int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % every == 0


def generate_tasks(n: int, seed: int, mix: dict, heldout: bool, heldout_every: int = 10) -> list[dict]:
    """n tasks drawn by `mix` = {"<domain_kind>/<lang>": weight} (kinds: arithmetic, instruction, tool)."""
    rng = random.Random(seed)
    keys, weights = list(mix), [float(v) for v in mix.values()]
    make = {"arithmetic": arithmetic_task, "instruction": instruction_task, "tool": tool_task}
    out, seen, tries = [], set(), 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise RuntimeError(f"generate_tasks: only {len(out)} of {n} distinct tasks found; lower n or widen the mix")
        kind, lang = rng.choices(keys, weights)[0].split("/")
        t = make[kind](rng, lang)
        if t["prompt"] in seen or is_heldout(t["prompt"], heldout_every) != heldout:
            continue
        seen.add(t["prompt"])
        out.append(t)
    return out


def build_dataset(kind: str, tasks: list[dict]) -> list[dict]:
    """sft_instruct: non-thinking only; sft_reasoning: thinking only; mod: both modes of the same
    prompt (paper 4.3); rl / eval: the prompt + task (the stage adds the mode tag, paper 4.4)."""
    out = []
    for i, t in enumerate(tasks):
        modes = {"sft_instruct": ["non_thinking"], "sft_reasoning": ["thinking"],
                 "mod": ["thinking", "non_thinking"], "rl": [None], "eval": [None]}[kind]
        for m in modes:
            if m is None:
                out.append({"id": f"{kind}-{i}", "lang": t["lang"], "domain": t["domain"], "task": t["task"],
                            "messages": [{"role": "user", "content": t["prompt"]}],
                            **({"tools": t["tools"]} if "tools" in t else {})})
                if kind == "eval":  # reference answers in both modes (a tool task's: its call), for the held-out loss
                    out[-1]["references"] = {mm: _record(t, mm, "")["messages"][1 if "tools" in t else -1]
                                             for mm in ("thinking", "non_thinking")}
            else:
                out.append(_record(t, m, f"{kind}-{i}-{m}"))
    return out


# ----------------------------------------------------------------------------------------
# Readers for real chat data: schema check with per-reason bad-record counts
# ----------------------------------------------------------------------------------------
def check_task(task) -> str | None:
    """The reason an RL / evaluation task cannot be graded by rl.py's verifiers, or None."""
    if not isinstance(task, dict):
        return "prompt without a task (RL and evaluation need a verifier)"
    if task.get("kind") == "exact":
        return None if isinstance(task.get("answer"), (str, int, float)) else "exact task without an answer"
    if task.get("kind") == "ifeval":
        cs = task.get("constraints")
        if not isinstance(cs, list) or not cs:
            return "ifeval task without constraints"
        if any(not isinstance(c, dict) or c.get("type") not in rl.CONSTRAINTS for c in cs):
            return "ifeval constraint of unknown type"
        return None
    if task.get("kind") == "tool_call":
        return None if isinstance(task.get("tool"), str) and isinstance(task.get("answer"), str) \
            else "tool_call task without tool and answer"
    return "task kind not exact/ifeval/tool_call"


def check_record(rec, mode: str | None) -> str | None:
    """The reason a record is unusable, or None. mode: thinking / non_thinking / any (either, as
    its last turn says) / None (a prompt for RL or evaluation: must end with the user turn and
    carry a gradable task)."""
    if not isinstance(rec, dict):
        return "record is not an object"
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "missing or empty messages"
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            return "message role not in system/user/assistant/tool"
        calls = m.get("tool_calls")
        if not isinstance(m.get("content"), str) and not (calls and m.get("content") is None):
            return "message content is not a string"
        if "<think>" in (m.get("content") or "") or "</think>" in (m.get("content") or ""):
            return "raw think tag in content (use reasoning_content)"
        rc = m.get("reasoning_content")
        if rc is not None and (not isinstance(rc, str) or "<think>" in rc or "</think>" in rc):
            return "reasoning_content is not a string without think tags"
        if m["role"] == "assistant" and not calls and not m["content"].strip():
            return "empty assistant content"
    why = tool_calls.check_tools(rec.get("tools")) or tool_calls.check_messages(msgs, rec.get("tools"))
    if why:
        return why
    if mode is None:
        if msgs[-1]["role"] != "user":
            return "last message is not from the user"
        refs = rec.get("references")  # evaluation: reference answers per mode (held-out NLL)
        if refs is not None and not (isinstance(refs, dict) and all(
                k in rl.MODES and check_record({"messages": msgs + [v]}, k) is None for k, v in refs.items())):
            return "references are not valid assistant turns per mode"
        return check_task(rec.get("task"))
    last = msgs[-1]
    if last["role"] != "assistant" or len(msgs) < 2:
        return "last message is not an assistant reply to a prompt"
    rc = last.get("reasoning_content")
    if mode == "any":  # MOD: each record is one mode; its pair shares the prompt
        mode = "non_thinking" if rc is None else "thinking"
    if mode == "thinking" and not (isinstance(rc, str) and rc.strip()):
        return "thinking-mode record without reasoning_content"
    if mode == "non_thinking" and rc is not None:
        return "non-thinking record carries reasoning_content"
    return None


def _drop_nulls(row: dict) -> dict:
    """Columnar formats give every message every field (a user turn gets reasoning_content=None);
    a null field means absent in the record schema."""
    if isinstance(row.get("messages"), list):
        row["messages"] = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m
                           for m in row["messages"]]
    return row


def read_rows(path: str | Path, stats: dict):
    """("file:line" or "file:rowN", row) for each row of a local .jsonl / .parquet file or a
    `datasets.save_to_disk` directory. JSONL lines go through data.jsonl_objects (the kit's one
    line reader), so an undecodable or truncated line is counted in `stats` and skipped."""
    p = Path(path)
    if p.is_dir():
        import datasets
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # a whole unreadable source is the user's to fix, not a bad record
            raise ValueError(f"{p}: not a readable datasets directory ({type(e).__name__}: {e})") from None
        yield from ((f"{p}:row{i}", _drop_nulls(dict(r))) for i, r in enumerate(ds))
    elif p.suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            rows = pq.read_table(p).to_pylist()
        except Exception as e:
            raise ValueError(f"{p}: not a readable parquet file ({type(e).__name__}: {e})") from None
        yield from ((f"{p}:row{i}", _drop_nulls(r)) for i, r in enumerate(rows))
    elif p.suffix in (".jsonl", ".json"):
        yield from data.jsonl_objects(p, lambda reason, where: data.note_bad(stats, reason, where))
    else:
        raise ValueError(f"{p}: expected .jsonl, .parquet or a datasets directory")


def read_source(path: str | Path, mode: str | None, fmt: str = "kit") -> tuple[list[dict], dict]:
    """Good records + {"bad": {reason: count}, "bad_examples": ["file:line: reason", ...]}: every
    bad record is counted and reported by the stage, never silently dropped, never raised.
    `fmt`: the rows' format (kit/chat_formats.py), converted to the record schema first."""
    good, stats = [], {"bad": {}, "bad_examples": []}
    for where, row in read_rows(path, stats):
        try:
            rec = chat_formats.convert(fmt, row, prompt_only=mode is None)
        except chat_formats.BadRow as e:
            data.note_bad(stats, str(e), where)
            continue
        why = check_record(rec, mode)
        if why:
            data.note_bad(stats, why, where)
            continue
        rec.setdefault("id", where)
        good.append(rec)
    return good, stats


def mix_sources(sources: dict[str, list[dict]], weights: dict[str, float], n: int, seed: int) -> list[dict]:
    """n records drawn so that each source's share follows its weight (e.g. Table 3's ratio of
    its domain x language cell); a small source is cycled (upsampled) to reach its share."""
    total = sum(weights[s] for s in sources if sources[s])
    rng, out = random.Random(seed), []
    for name, recs in sources.items():
        if not recs or weights.get(name, 0) <= 0:
            continue
        k = round(n * weights[name] / total)
        order = list(range(len(recs)))
        rng.shuffle(order)
        out += [recs[order[j % len(recs)]] for j in range(k)]
    rng.shuffle(out)
    return out


# ----------------------------------------------------------------------------------------
# SFT tokenisation: loss on the response only
# ----------------------------------------------------------------------------------------
def encode_chat(tok, messages: list[dict], tools: list | None = None) -> tuple[list[int], list[int]]:
    """input_ids of the whole chat and labels that are IGNORE_INDEX on every prompt token.

    Trained: each assistant turn after the last user turn (one, or an agentic trajectory's calls
    and final answer), from just after the mode tag the template opens it with (<think> or
    </think>: the user picks the mode at inference, paper 4.4) through its <|eos|>: reasoning,
    </think>, response, tool calls. Masked: everything else, tool results included.
    """
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    full = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    ids = tok(full, add_special_tokens=False)["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for i in (i for i, m in enumerate(messages) if m["role"] == "assistant" and i > last_user):
        thinking = messages[i].get("reasoning_content") is not None
        spans = []
        for text in (tok.apply_chat_template(messages[:i], tools=tools, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=thinking),
                     tok.apply_chat_template(messages[:i + 1], tools=tools, tokenize=False)):
            if not full.startswith(text):
                raise ValueError("chat template: the prompt rendering is not a prefix of the full chat")
            part = tok(text, add_special_tokens=False)["input_ids"]
            if ids[:len(part)] != part:
                raise ValueError("chat template: prompt tokens differ inside the full chat "
                                 "(tokenizer merges across the boundary)")
            spans.append(len(part))
        labels[spans[0]:spans[1]] = ids[spans[0]:spans[1]]
    return ids, labels


def encode_prompt(tok, messages: list[dict], mode: str, tools: list | None = None) -> list[int]:
    """The RL / evaluation prompt: chat + <|assistant|> + the mode's control tag (paper 4.4)."""
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                   enable_thinking=(mode == "thinking"))
    return tok(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------
# One entry point for the stages: conf/posttrain_data/*.yaml -> records of a dataset kind
# ----------------------------------------------------------------------------------------
_MODE_OF = {"sft_instruct": "non_thinking", "sft_reasoning": "thinking", "mod": "any", "rl": None, "eval": None}
_SEED_OFFSET = {"sft_instruct": 1, "sft_reasoning": 2, "mod": 3, "rl": 4, "eval": 5}


def load_posttrain(pd, kind: str) -> tuple[list[dict], dict]:
    """Records for `kind` (sft_instruct | sft_reasoning | mod | rl | eval) and a report
    {"n": ..., "bad": {source: {reason: count}}, "weights": {source: weight}}."""
    if kind not in _MODE_OF:
        raise ValueError(f"dataset kind {kind!r}: expected one of {sorted(_MODE_OF)}")
    if kind == "mod" and pd.get("mod_file"):  # built by stages/mod_data.py (`make mod-data`)
        if not Path(pd.mod_file).is_file():
            raise FileNotFoundError(f"posttrain_data/{pd.name}.yaml mod_file={pd.mod_file}: not found (run `make mod-data`)")
        recs, st = read_source(pd.mod_file, "any")
        return recs, {"n": len(recs), "bad": {str(pd.mod_file): st["bad"]}, "bad_examples": {str(pd.mod_file):
                                                                                           st["bad_examples"]},
                      "weights": {str(pd.mod_file): 1.0}, "mod_file": str(pd.mod_file)}
    if pd.kind == "synthetic":
        tasks = generate_tasks(int(pd.sizes[kind]), int(pd.seed) * 100 + _SEED_OFFSET[kind], dict(pd.mix[kind]),
                               heldout=(kind == "eval"), heldout_every=int(pd.heldout_every))
        recs = build_dataset(kind, tasks)
        return recs, {"n": len(recs), "bad": {}, "weights": dict(pd.mix[kind])}
    if pd.kind != "files":
        raise ValueError(f"posttrain_data/{pd.name}.yaml kind={pd.kind!r}: expected 'synthetic' or 'files'")
    srcs = pd.sources.get(kind) or []
    if not srcs:
        raise ValueError(f"posttrain_data/{pd.name}.yaml sources.{kind}: no sources listed")
    loaded, bad, examples, weights = {}, {}, {}, {}
    cell_count = Counter((s["lang"], s["domain"]) for s in srcs)
    for s in srcs:
        name = s.get("name", str(s["path"]))
        recs, st = read_source(s["path"], _MODE_OF[kind], s.get("format", "kit"))
        for r in recs:
            r.setdefault("lang", s["lang"])
            r.setdefault("domain", s["domain"])
        loaded[name], bad[name], examples[name] = recs, st["bad"], st["bad_examples"]
        table = (pd.get("table3") or {}).get(kind)
        # Table 3 gives the share of each (language, domain) cell; sources in one cell split it.
        weights[name] = (float(table[s["lang"]][s["domain"]]) if table else 1.0) / cell_count[(s["lang"], s["domain"])]
    n = int(pd.sizes[kind]) if pd.get("sizes") and pd.sizes.get(kind) else sum(len(v) for v in loaded.values())
    return mix_sources(loaded, weights, n, int(pd.seed)), {"n": n, "bad": bad, "bad_examples": examples,
                                                           "weights": weights}
