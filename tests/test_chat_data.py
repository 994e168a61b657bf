"""chat_data.py: generator correctness, splits, readers with bad-record counts, SFT masking."""

import json
from collections import Counter

import pytest
from omegaconf import OmegaConf

from kit import chat_data
import rl
import tokenizer as T

MIX = {"arithmetic/en": 1, "arithmetic/ko": 1, "instruction/en": 1, "instruction/ko": 1}


@pytest.fixture(scope="module")
def tok():
    docs = ["What is 12 + 35? Answer: 47", "바다는 넓고 깊습니다", "Write about the sea."] * 20
    return T.to_transformers(T.train_tokenizer(docs, vocab_size=384, show_progress=False))


def test_generator_is_seeded_and_correct():
    a, b = chat_data.generate_tasks(300, 7, MIX, heldout=False), chat_data.generate_tasks(300, 7, MIX, heldout=False)
    assert a == b and a != chat_data.generate_tasks(300, 8, MIX, heldout=False)
    assert Counter(t["lang"] for t in a).keys() == {"en", "ko"}
    for t in a:
        for mode, text in (("non_thinking", t["direct"]), ("thinking", t["trace"] + "</think>" + t["final"])):
            r = rl.reward(text, mode, t["task"], 10, rl.RewardConfig())
            assert r.well_formed and r.accuracy == 1.0, (mode, t)
        if t["task"]["kind"] == "exact":
            x, op, y = t["direct"].split(" = ")[0].split()
            assert int(t["task"]["answer"]) == {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y)}[op]
            assert t["trace"].rstrip(".").endswith(t["task"]["answer"])


@pytest.mark.parametrize("a, b, op, lang, want", [
    (347, 285, "add", "en", "ones 7 + 5 = 12, carry 1; tens 4 + 8 + 1 = 13, carry 1; hundreds 3 + 2 + 1 = 6. So 347 + 285 = 632."),
    (532, 187, "sub", "en", "ones 12 - 7 = 5, borrow 1; tens 12 - 8 = 4, borrow 1; hundreds 4 - 1 = 3. So 532 - 187 = 345."),
    (47, 36, "mul", "ko", "47 * 30 = 1410; 47 * 6 = 282; 1410 + 282 = 1692. 따라서 47 * 36 = 1692."),
])
def test_arithmetic_trace(a, b, op, lang, want):
    assert chat_data.arithmetic_trace(a, b, op, lang) == want


def test_heldout_split_and_dataset_modes():
    train = chat_data.generate_tasks(400, 1, MIX, heldout=False)
    held = chat_data.generate_tasks(40, 2, MIX, heldout=True)
    assert not {t["prompt"] for t in train} & {t["prompt"] for t in held}
    ins, rea, mod = (chat_data.build_dataset(k, train[:50]) for k in ("sft_instruct", "sft_reasoning", "mod"))
    assert all("reasoning_content" not in r["messages"][-1] for r in ins)
    assert all(r["messages"][-1]["reasoning_content"] for r in rea)
    assert len(mod) == 100 and all(mod[i]["messages"][0] == mod[i + 1]["messages"][0] for i in range(0, 100, 2))
    assert {("reasoning_content" in r["messages"][-1]) for r in mod} == {True, False}
    rlset = chat_data.build_dataset("rl", train[:5])
    assert all(r["messages"][-1]["role"] == "user" and "task" in r for r in rlset)
    for kind, mode in (("sft_instruct", "non_thinking"), ("sft_reasoning", "thinking"), ("mod", "any"), ("rl", None)):
        assert all(chat_data.check_record(r, mode) is None for r in chat_data.build_dataset(kind, train[:20]))


def test_reader_counts_bad_records(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    rows = [good, good,
            {"messages": []},
            {"messages": [{"role": "bot", "content": "x"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>x</think>y"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "r"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]}]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    recs, st = chat_data.read_source(p, "non_thinking")
    assert len(recs) == 2 and recs[0]["id"] == f"{p}:1"
    assert st["bad"] == {"missing or empty messages": 1, "message role not in system/user/assistant/tool": 1,
                         "raw think tag in content (use reasoning_content)": 1,
                         "non-thinking record carries reasoning_content": 1,
                         "message content is not a string": 1, "malformed_json": 1}
    assert f"{p}:3: missing or empty messages" in st["bad_examples"] and f"{p}:8: malformed_json" in st["bad_examples"]
    _, st = chat_data.read_source(p, "thinking")
    assert st["bad"]["thinking-mode record without reasoning_content"] == 2
    with pytest.raises(ValueError, match="expected .jsonl, .parquet"):
        chat_data.read_source(tmp_path / "x.csv", "any")


def test_parquet_and_datasets_dir(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    # MOD rows mix both modes: columnar storage gives non-thinking turns reasoning_content=None,
    # which must read back as absent (not as a non-thinking record carrying reasoning)
    recs = chat_data.build_dataset("mod", chat_data.generate_tasks(6, 3, MIX, heldout=False))
    rows = [{"messages": r["messages"]} for r in recs]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    got, st = chat_data.read_source(tmp_path / "d.parquet", "any")
    assert len(got) == 12 and not st["bad"] and [g["messages"] for g in got] == [r["messages"] for r in rows]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    got, st = chat_data.read_source(tmp_path / "ds", "any")
    assert len(got) == 12 and not st["bad"] and got[1]["messages"] == rows[1]["messages"]


def test_table3_weights_and_mixing(tmp_path):
    def write(name, n, reasoning):
        asst = {"role": "assistant", "content": "a"}
        if reasoning:
            asst["reasoning_content"] = "r"
        p = tmp_path / name
        p.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"{name} {i}"}, asst]})
                               for i in range(n)))
        return str(p)
    pd = OmegaConf.load("conf/posttrain_data/table3.yaml")
    pd.sizes = {"sft_instruct": 1000}
    pd.sources.sft_instruct = [{"path": write("m1.jsonl", 10, False), "lang": "en", "domain": "Math"},
                               {"path": write("m2.jsonl", 10, False), "lang": "en", "domain": "Math"},
                               {"path": write("g.jsonl", 10, False), "lang": "ko", "domain": "General"},
                               {"path": write("bad.jsonl", 3, True), "lang": "en", "domain": "Code"}]
    recs, rep = chat_data.load_posttrain(pd, "sft_instruct")
    # Table 3 instruct: en Math 19.6 (split over 2 sources), ko General 13.4
    assert rep["weights"]["m1.jsonl".join([str(tmp_path) + "/", ""])] == pytest.approx(9.8)
    assert rep["bad"][str(tmp_path / "bad.jsonl")] == {"non-thinking record carries reasoning_content": 3}
    share = Counter(r["messages"][0]["content"].split()[0] for r in recs)
    assert share["g.jsonl"] / len(recs) == pytest.approx(13.4 / (19.6 + 13.4), abs=0.01)
    assert all(r["lang"] in ("en", "ko") and r["domain"] for r in recs)
    pd.sources.rl = []
    with pytest.raises(ValueError, match="sources.rl: no sources"):
        chat_data.load_posttrain(pd, "rl")


@pytest.mark.parametrize("mode", ["thinking", "non_thinking"])
def test_sft_masks_prompt_tokens(tok, mode):
    asst = {"role": "assistant", "content": "Answer: 47"}
    if mode == "thinking":
        asst["reasoning_content"] = "2 + 5 = 7"
    msgs = [{"role": "user", "content": "What is 12 + 35?"}, asst]
    ids, labels = chat_data.encode_chat(tok, msgs)
    prompt = chat_data.encode_prompt(tok, msgs[:1], mode)
    n = len(prompt)
    assert ids[:n] == prompt and tok.decode(prompt[-1:]) == ("<think>" if mode == "thinking" else "</think>")
    assert labels[:n] == [chat_data.IGNORE_INDEX] * n
    assert labels[n:] == ids[n:] and all(x != chat_data.IGNORE_INDEX for x in labels[n:])
    want = ("2 + 5 = 7</think>" if mode == "thinking" else "") + "Answer: 47<|eos|>"
    assert tok.decode(labels[n:]) == want


def test_multi_turn_masks_earlier_turns(tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ok"}]
    ids, labels = chat_data.encode_chat(tok, msgs)
    assert tok.decode([x for x in labels if x != chat_data.IGNORE_INDEX]) == "ok<|eos|>"
