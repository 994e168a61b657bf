"""Every post-training reader (SFT instruct/reasoning, MOD, RL, eval; JSONL, parquet, datasets
dirs) keeps the good records of a planted bad file and counts each bad one with its reason and
file:line, without raising (issue 11, item 5)."""

import json

import pytest
from omegaconf import OmegaConf

from kit import chat_data

MIX = {"arithmetic/en": 1, "instruction/ko": 1}
KINDS = ("sft_instruct", "sft_reasoning", "mod", "rl", "eval")
# what each planted row breaks, and the reason the reader must give for it
PLANTED = {
    "wrong role": "message role not in system/user/assistant/tool",
    "raw think tags": "raw think tag in content (use reasoning_content)",
    "empty assistant turn": "empty assistant content",
}


def planted_rows(kind: str) -> tuple[list[dict], list[dict]]:
    good = chat_data.build_dataset(kind, chat_data.generate_tasks(4, 7, MIX, heldout=(kind == "eval")))
    g = good[0]
    user, rest = g["messages"][0], g["messages"][1:]
    bad = [
        {**g, "messages": [{"role": "bot", "content": user["content"]}] + rest},
        {**g, "messages": [{"role": "user", "content": "<think>" + user["content"]}] + rest},
        # an empty assistant turn: the reply itself (SFT/MOD) or an earlier turn of a prompt (RL/eval)
        {**g, "messages": g["messages"][:-1] + [{**g["messages"][-1], "content": " "}]} if kind not in ("rl", "eval")
        else {**g, "messages": [user, {"role": "assistant", "content": ""}, user]},
    ]
    return good, bad


def write(fmt: str, path, rows: list[dict], extra_lines: list[bytes]):
    if fmt == "jsonl":
        with open(path, "wb") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False).encode() + b"\n")
            for x in extra_lines:
                f.write(x + b"\n")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets
        datasets.Dataset.from_list(rows).save_to_disk(str(path))


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "dataset"])
@pytest.mark.parametrize("kind", KINDS)
def test_planted_bad_records_are_counted_not_raised(tmp_path, kind, fmt):
    good, bad = planted_rows(kind)
    rows = good[:2] + bad + good[2:]  # bad rows in the middle: rows 3-5 (1-based lines in JSONL)
    extra = []
    if fmt == "jsonl":  # only a text file can hold a broken line
        extra = [json.dumps(good[0], ensure_ascii=False)[:-7].encode(),            # truncated JSON line
                 "{\"messages\": \"caf\xe9\"}".encode("latin-1")]                   # invalid UTF-8
    path = tmp_path / {"jsonl": "d.jsonl", "parquet": "d.parquet", "dataset": "ds"}[fmt]
    write(fmt, path, rows, extra)
    pd = OmegaConf.load("conf/posttrain_data/table3.yaml")
    pd.sources[kind] = [{"path": str(path), "lang": "en", "domain": "Math"}]

    recs, rep = chat_data.load_posttrain(pd, kind)

    assert sorted(r["messages"][0]["content"] for r in recs) == sorted(r["messages"][0]["content"] for r in good)
    want = {reason: 1 for reason in PLANTED.values()}
    if fmt == "jsonl":
        want.update({"malformed_json": 1, "invalid_utf8": 1})
    assert rep["bad"][str(path)] == want
    row = (lambda i: f"{path}:{i + 1}") if fmt == "jsonl" else (lambda i: f"{path}:row{i}")
    examples = rep["bad_examples"][str(path)]
    for i, reason in enumerate(PLANTED.values(), start=2):
        assert f"{row(i)}: {reason}" in examples
    if fmt == "jsonl":
        n = len(rows)
        assert f"{path}:{n + 1}: malformed_json" in examples and f"{path}:{n + 2}: invalid_utf8" in examples


def test_prompt_records_need_a_gradable_task(tmp_path):
    good, _ = planted_rows("rl")
    no_task = {k: v for k, v in good[0].items() if k != "task"}
    unknown = {**good[0], "task": {"kind": "ifeval", "constraints": [{"type": "rhymes"}]}}
    p = tmp_path / "rl.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [no_task, unknown] + good))
    recs, st = chat_data.read_source(p, None)
    assert len(recs) == len(good)
    assert st["bad"] == {"prompt without a task (RL and evaluation need a verifier)": 1,
                         "ifeval constraint of unknown type": 1}


def test_unreadable_file_is_one_line(tmp_path):
    p = tmp_path / "d.parquet"
    p.write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"d.parquet: not a readable parquet file"):
        chat_data.read_source(p, "any")
