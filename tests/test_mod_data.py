"""stages/mod_data.py (issue 20 item 4): the two SFT sets joined by prompt; a prompt answered in
one mode only gets the other mode from that mode's SFT checkpoint, kept only if well formed (and
correct where a verifier exists), every drop counted per reason; mod_sft reads the file."""

import json

import torch
import torch.distributed.checkpoint as dcp
from conftest import ROOT, compose_cfg, stage_module
from omegaconf import OmegaConf, open_dict

import model as axk1
from kit import chat_data, kv_decoding

PAIRED = "What is 2 + 3?"


def chat(prompt, answer, reasoning=None, task=None):
    asst = {"role": "assistant", "content": answer, **({"reasoning_content": reasoning} if reasoning else {})}
    return {"messages": [{"role": "user", "content": prompt}, asst], **({"task": task} if task else {})}


def test_join_generate_verify_and_count(tmp_path, monkeypatch, tiny_data):
    monkeypatch.chdir(ROOT)
    instruct = [chat(PAIRED, "Answer: 5"), chat("What is 4 + 4?", "Answer: 8", task={"kind": "exact", "answer": "8"})]
    reasoning = [chat(PAIRED, "Answer: 5", "2 + 3 = 5"), chat("Say hello.", "hello", "greet")]
    for name, rows in (("instruct", instruct), ("reasoning", reasoning)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    torch.manual_seed(0)
    net = kv_decoding.build_inference_model(axk1.load_model_cfg("tiny"))
    dcp.save({"model": net.state_dict()}, checkpoint_id=str(tmp_path / "sft_ckpt"))
    cfg = compose_cfg("mod_data", ["posttrain_data=table3", f"run_dir={tmp_path / 'mod'}", "max_new_tokens=8",
                                   f"reasoning_from={tmp_path / 'sft_ckpt'}", f"instruct_from={tmp_path / 'sft_ckpt'}"])
    with open_dict(cfg):
        for kind, name in (("sft_instruct", "instruct"), ("sft_reasoning", "reasoning")):
            cfg.posttrain_data.sources[kind] = [{"path": str(tmp_path / f"{name}.jsonl"), "lang": "en", "domain": "Math"}]
    summary = stage_module("mod_data").run(cfg)
    assert summary["prompts"] == 3 and summary["paired_in_data"] == 1
    counts = summary["counts"]
    # one answer generated per mode (thinking for "What is 4 + 4?", direct for "Say hello."): each kept or dropped with a reason
    for mode in ("thinking", "non_thinking"):
        assert sum(v for k, v in counts.items() if k.endswith(mode) or f" {mode} " in k) == 1, counts
    # the two generated answers complete two different prompts: each kept one makes a pair
    assert summary["pairs_kept"] == 1 + counts["generated: thinking"] + counts["generated: non_thinking"]
    print(f"mod_data counts: {counts}, pairs kept {summary['pairs_kept']}")
    rows = [json.loads(x) for x in (tmp_path / "mod" / "mod.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * summary["pairs_kept"]
    assert [r["messages"][-1] for r in rows[:2]] == [reasoning[0]["messages"][-1], instruct[0]["messages"][-1]]
    assert json.loads((tmp_path / "mod" / "mod_counts.json").read_text())["counts"] == counts
    # mod_sft's switch: the file instead of generated / listed MOD data
    pd = OmegaConf.merge(compose_cfg("sft", ["stage=mod_sft"]).posttrain_data, {"mod_file": str(tmp_path / "mod" / "mod.jsonl")})
    records, report = chat_data.load_posttrain(pd, "mod")
    assert [r["messages"] for r in records] == [r["messages"] for r in rows] and report["mod_file"]


def test_generated_answers_are_kept_only_when_well_formed_and_correct(tmp_path):
    """The keep rule on fixed texts: what fill() applies to each decoded answer."""
    import rl

    task = {"kind": "exact", "answer": "8"}
    assert rl.split_response("4 + 4 = 8</think>Answer: 8", "thinking")[0]
    assert not rl.split_response("Answer: 8", "thinking")[0]  # no </think>: malformed for thinking
    assert not rl.split_response("x</think>Answer: 8", "non_thinking")[0]  # a think tag in a direct answer
    assert rl.correctness("Answer: 8", task) == 1.0 and rl.correctness("Answer: 9", task) == 0.0
