"""The paper's benchmarks (Tables 4-5) as items, prompts and scores: conf/bench/paper_tables.yaml
names each benchmark's file and fields; this module reads the file, writes the prompt the paper's
protocol asks for and scores one generated text.

    items = load_items(spec, data_root, seed)     # [] never: a missing file raises NoData naming it
    item["messages"]                              # the chat request (one user turn)
    score_output(spec, item, text, mode, ...)     # -> Scored(score 0..1, malformed, answer)

The final answer is read after </think> with rl.split_response, the RL format rule: an unclosed
think block (or a think tag in non-thinking output) is malformed and scores 0.
"""

from __future__ import annotations

import base64
import csv
import glob
import io
import json
import pickle
import random
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import rl
from kit import code_sandbox, instruction_checks


class NoData(FileNotFoundError):
    """The benchmark's file is not under bench.data_root: its row says `no data` and names the file."""


@dataclass
class Scored:
    score: float
    malformed: bool
    answer: str          # what was read as the final answer (the text after </think>)
    detail: str = ""     # why it scored what it scored (extracted letter/number, failed test, ...)


# ----------------------------------------------------------------------------------------
# Reading the published files
# ----------------------------------------------------------------------------------------
def read_records(path: Path) -> list[dict]:
    """JSON lines, a JSON list, CSV or Parquet, by extension."""
    if path.suffix == ".jsonl":
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):  # one JSON list under a .jsonl name (snunlp/KoBALT-700's data/train.jsonl)
            return json.loads(text)
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not a JSON object per line ({e.msg})") from None
        return records
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, list) else [data]
    if path.suffix == ".csv":
        return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig"))))
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # in the kit's lock (datasets needs it)
        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: expected .jsonl, .json, .csv or .parquet")


def data_files(spec, data_root: Path) -> list[Path]:
    pattern = str(Path(data_root) / spec.file)
    files = sorted(Path(p) for p in glob.glob(pattern))
    if not files:
        raise NoData(pattern)
    return files


def _field(rec: dict, name: str, path: Path, benchmark: str):
    if name not in rec:
        raise KeyError(f"{path}: {benchmark} record has no field {name!r} (fields: {sorted(rec)[:12]}); "
                       f"see conf/bench/paper_tables.yaml {benchmark}.fields")
    return rec[name]


def load_items(spec, data_root: Path, seed: int, letters: str, key: str = "") -> list[dict]:
    """Every item of the benchmark's file(s), with its chat messages and what scoring needs."""
    items = []
    for path in data_files(spec, data_root):
        for rec in read_records(path):
            item = _item(spec, rec, path, seed + len(items), letters, key)
            if item is not None:
                items.append(item)
    return items


def _item(spec, rec: dict, path: Path, seed: int, letters: str, key: str) -> dict | None:
    f = spec.fields
    get = lambda name: _field(rec, name, path, key)  # noqa: E731
    if spec.kind == "multiple_choice":
        return _choice_item(spec, rec, get, seed, letters)
    if spec.kind == "math":
        return {"messages": _user(f"{get(f.question)}\n\n{MATH_COT}"), "target": str(get(f.answer))}
    if spec.kind == "short_answer":
        if f.get("image") and rec.get(f.image):
            return None  # the text-only subset (the kit serves a text model)
        mc = str(rec.get(f.answer_type, "")) == "multipleChoice"
        return {"messages": _user(f"{get(f.question)}\n\n{SHORT_COT}"), "target": str(get(f.answer)),
                "choice": mc}
    if spec.kind == "instructions":
        kwargs = get(f.kwargs)
        return {"messages": _user(get(f.prompt)), "instructions": list(get(f.instructions)),
                "kwargs": [dict(k or {}) for k in kwargs]}
    if spec.kind == "code_function":
        return {"messages": _user(f"{CODE_FUNCTION}\n```python\n{get(f.prompt)}```"), "prompt": get(f.prompt),
                "entry_point": get(f.entry_point), "test": get(f.test)}
    if spec.kind == "code_mbpp":
        examples = get(f.examples)
        shown = examples[0] if isinstance(examples, list) and examples else str(examples)
        return {"messages": _user(f"{get(f.prompt)}\nYour code should pass this test:\n{shown}\n\n{CODE_PROGRAM}"),
                "test": get(f.test)}
    if spec.kind == "code_stdin":
        date = str(get(f.date))[:10]
        if spec.get("dates") and not spec.dates[0] <= date < spec.dates[1]:
            return None
        meta = get(f.metadata)
        meta = json.loads(meta) if isinstance(meta, str) and meta else (meta or {})
        tests = _cases(get(f.public)) + _cases(get(f.private))
        starter = get(f.starter) or ""
        how = CODE_STARTER.format(starter=starter) if starter else CODE_STDIN
        return {"messages": _user(f"{get(f.question)}\n\n{how}"), "tests": tests,
                "func_name": meta.get("func_name")}
    raise ValueError(f"conf/bench/paper_tables.yaml {key}.kind={spec.kind}: not a scored kind")


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


class _StringsOnly(pickle.Unpickler):
    def find_class(self, module, name):  # the private tests are a pickled str: nothing else may load
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a test-case blob")


def _cases(blob) -> list[dict]:
    """LiveCodeBench test cases: a JSON list, or (private ones) base64(zlib(pickle(JSON str)))."""
    if isinstance(blob, list):
        return blob
    if not blob:
        return []
    try:
        return json.loads(blob)
    except json.JSONDecodeError:
        raw = _StringsOnly(io.BytesIO(zlib.decompress(base64.b64decode(blob)))).load()
        return json.loads(raw)


# ----------------------------------------------------------------------------------------
# Prompts (paper B.2: Chat-CoT for math, MMLU(-Pro), KMMLU; CLIcK zero-shot; code by execution)
# ----------------------------------------------------------------------------------------
MATH_COT = "Please reason step by step, and put your final answer within \\boxed{}."
SHORT_COT = "Think step by step, then end your response with a line 'Answer: <your final answer>'."
CODE_FUNCTION = "Complete the following Python function. Reply with the whole function in one ```python block."
CODE_PROGRAM = "Write the Python function. Reply with the code in one ```python block."
CODE_STDIN = ("Write a Python program that reads the input from standard input and writes the answer to "
              "standard output. Reply with the program in one ```python block.")
CODE_STARTER = "Complete this code and reply with it in one ```python block:\n```python\n{starter}\n```"


def _choice_item(spec, rec: dict, get, seed: int, letters: str) -> dict:
    f = spec.fields
    question = str(get(f.question))
    if f.get("context") and rec.get(f.context):
        question = f"{rec[f.context]}\n\n{question}"
    if f.choices is None:  # the options are already written inside the question (KoBALT)
        choices, answer = None, str(get(f.answer)).strip().strip("()").upper()[:1]
    else:
        choices = [get(c) for c in f.choices] if not isinstance(f.choices, str) else list(get(f.choices))
        choices = [str(c) for c in choices]
        if spec.answer_format == "first_is_correct":  # GPQA: shuffle so the right one is not always A
            order = list(range(len(choices)))
            random.Random(seed).shuffle(order)
            choices, answer = [choices[i] for i in order], letters[order.index(0)]
        else:
            answer = _answer_letter(spec.answer_format, get(f.answer), choices, letters)
    valid = letters[:len(choices)] if choices else letters
    lines = [question] + ([f"{letters[i]}. {c}" for i, c in enumerate(choices)] if choices else [])
    listed = ", ".join(valid[:-1]) + f" or {valid[-1]}"
    if spec.prompt == "chat_cot":  # the Llama 3 Chat-CoT protocol (Dubey et al., 2024)
        text = ("Given the following question and candidate answers, choose the best answer.\n"
                + "\n".join(lines) + f'\n\nYour response should end with "The best answer is [the_answer_letter]" '
                f"where [the_answer_letter] is one of {listed}.\nLet's think step by step.")
    else:  # zero-shot: the letter only
        text = "\n".join(lines) + f"\n\nAnswer with the letter of the correct option ({listed}) only."
    return {"messages": _user(text), "target": answer, "letters": valid}


def _answer_letter(fmt: str, value, choices: list[str], letters: str) -> str:
    if fmt == "letter":
        return str(value).strip().strip("()").upper()[:1]
    if fmt == "index1":
        return letters[int(float(value)) - 1]
    if fmt == "index0":
        return letters[int(float(value))]
    if fmt == "text":
        return letters[[c.strip() for c in choices].index(str(value).strip())]
    raise ValueError(f"answer_format={fmt}: expected letter, index1, index0, text or first_is_correct")


# ----------------------------------------------------------------------------------------
# Reading the answer
# ----------------------------------------------------------------------------------------
def final_answer(text: str, mode: str) -> tuple[bool, str]:
    """(well formed, the final answer). Thinking mode: the text after </think>; a leading <think>
    that the server's template did not prefill is dropped first. Malformed outputs (rl.split_response:
    unclosed <think>, a think tag in non-thinking output, ...) give no answer."""
    if mode == "thinking" and text.lstrip().startswith(rl.THINK):
        text = text.lstrip()[len(rl.THINK):]
    ok, _, _, response = rl.split_response(text, mode)
    return ok, response if ok else ""


_LETTER_CUES = [r"best answer is\s*[:\s]*\(?\**([A-J])\b", r"answer is\s*[:\s]*\(?\**([A-J])\b",
                r"(?:정답|답)\s*(?:은|는|:)\s*\(?\**([A-J])\b", r"answer\s*:\s*\(?\**([A-J])\b", r"\\boxed\{([A-J])\}"]


def extract_letter(answer: str, letters: str) -> str:
    """The chosen option: the last explicit cue ('The best answer is C', '정답은 C', \\boxed{C}),
    else a reply that is just the letter ('C', '(C)', 'C. text')."""
    for cue in _LETTER_CUES:
        found = [m for m in re.findall(cue, answer, re.IGNORECASE) if m.upper() in letters]
        if found:
            return found[-1].upper()
    bare = re.match(r"^\s*\(?\**([A-J])\**\)?(?:[.:)\s]|$)", answer)
    return bare.group(1) if bare and bare.group(1) in letters else ""


def boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def _normalize(ans: str) -> str:
    ans = re.sub(r"\\text\{([^}]*)\}", r"\1", str(ans)).replace("$", "").replace("\\!", "").replace("\\%", "")
    ans = re.sub(r"\\[dt]?frac\{([^}]*)\}\{([^}]*)\}", r"(\1)/(\2)", ans)
    return ans.strip().rstrip(".").replace(" ", "").replace("{,}", "")


def _number(ans: str) -> float | None:
    s = ans.replace(",", "").lstrip("+")
    frac = re.fullmatch(r"\(?(-?\d+(?:\.\d+)?)\)?/\(?(-?\d+(?:\.\d+)?)\)?", s)
    if frac:
        return float(frac.group(1)) / float(frac.group(2)) if float(frac.group(2)) else None
    try:
        return float(s)
    except ValueError:
        return None


def extract_math(answer: str) -> str:
    """\\boxed{} first, then 'answer is X' / 'Answer: X' / '정답: X', then the last number."""
    found = boxed(answer)
    if found is not None:
        return found
    cue = re.findall(r"(?:answer is|answer:|정답은|정답:|답:)\s*\$?([^\n$]+)", answer, re.IGNORECASE)
    if cue:
        return cue[-1].strip()
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", answer)
    return numbers[-1] if numbers else ""


def math_equal(got: str, target: str) -> bool:
    a, b = _normalize(got), _normalize(target)
    if a == b and a:
        return True
    x, y = _number(a), _number(b)
    return x is not None and y is not None and abs(x - y) <= 1e-6 * max(1.0, abs(y))


def score_output(spec, item: dict, text: str, mode: str, sandbox) -> Scored:
    ok, answer = final_answer(text, mode)
    if not ok:
        return Scored(0.0, True, "", "malformed think tags")
    kind = spec.kind
    if kind == "multiple_choice":
        got = extract_letter(answer, item["letters"])
        return Scored(float(got == item["target"]), False, answer, f"chose {got or '-'}, right {item['target']}")
    if kind == "math":
        got = extract_math(answer)
        return Scored(float(math_equal(got, item["target"])), False, answer, f"read {got!r}, right {item['target']!r}")
    if kind == "short_answer":
        cue = re.findall(r"Answer\s*:\s*(.+)", answer)
        got = cue[-1].strip() if cue else ""
        right = (extract_letter(got, "ABCDEFGHIJ") == item["target"].strip().upper()[:1]) if item["choice"] \
            else math_equal(got, item["target"]) or got.strip().lower() == item["target"].strip().lower()
        return Scored(float(right), False, answer, f"read {got!r}")
    if kind == "instructions":
        strict = spec.metric == "prompt_strict"
        passed, detail = instruction_checks.follows_all(answer, item["instructions"], item["kwargs"], strict=strict)
        return Scored(float(passed), False, answer, detail)
    if kind.startswith("code_"):
        return _score_code(kind, item, answer, sandbox)
    raise ValueError(f"kind={kind}: not a scored kind")


def extract_code(answer: str) -> str:
    """The last ```python (or bare ```) block, else the whole answer."""
    blocks = re.findall(r"```(?:python|py|Python)?[^\n]*\n(.*?)```", answer, re.S)
    return blocks[-1] if blocks else answer


def _score_code(kind: str, item: dict, answer: str, sandbox) -> Scored:
    code = extract_code(answer)
    if kind == "code_function":
        if not re.search(rf"def\s+{re.escape(item['entry_point'])}\s*\(", code):
            code = item["prompt"] + code  # the body alone: complete the prompt's function
        result = sandbox.run(f"{code}\n\n{item['test']}\n\ncheck({item['entry_point']})\n")
        return Scored(float(result.passed), False, answer, result.reason)
    if kind == "code_mbpp":
        result = sandbox.run(f"{code}\n\n{item['test']}\n")
        return Scored(float(result.passed), False, answer, result.reason)
    for n, case in enumerate(item["tests"]):
        result = code_sandbox.run_case(sandbox, code, case, item.get("func_name"))
        if not result.passed:
            return Scored(0.0, False, answer, f"test {n}: {result.reason}")
    return Scored(1.0, False, answer, f"{len(item['tests'])} tests passed")
