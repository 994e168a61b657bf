"""Build the Mode-Overlap Dataset (paper 4.3): for the same prompts, a thinking trajectory and a
direct answer. config -> join the two SFT sets by prompt -> fill the missing mode with the
matching SFT checkpoint -> keep well-formed (and correct, where a verifier exists) -> write.

    python stages/mod_data.py                      # runs/<model>/mod_data/mod.jsonl from the smoke's SFT runs
    make mod-data
    python stages/sft.py stage=mod_sft posttrain_data.mod_file=runs/tiny/mod_data/mod.jsonl
    python stages/mod_data.py --cfg job --resolve  # prints the fully composed config, runs nothing

A prompt answered in both SFT sets is paired as it is. A prompt with only a direct answer gets a
thinking one from the Reasoning SFT checkpoint (prompt + <think>); one with only a thinking answer
gets a direct one from the Instruct SFT checkpoint (prompt + </think>): greedy, with the kit's
KV-cached decoder, encoded with each checkpoint's own tokenizer. A generated answer is kept only
if it is well formed for its mode (rl.split_response) and, where the record carries a task,
fully correct (rl.correctness); every drop is counted per reason in mod_counts.json.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

import rl
from kit import chat_data, checkpoint_tokenizer, checkpoints, kv_decoding
from kit.progress_bar import progress

# which SFT checkpoint writes which mode's missing answer
WRITER = {"thinking": "reasoning_from", "non_thinking": "instruct_from"}


def prompt_key(record: dict) -> str:
    """The join key: everything before the answer (tools included), as canonical JSON."""
    return json.dumps({"messages": record["messages"][:-1], "tools": record.get("tools")}, sort_keys=True,
                      ensure_ascii=False)


def join(instruct: list[dict], reasoning: list[dict]) -> tuple[list[tuple], dict]:
    """[(prompt record, {mode: answer message or None})] in first-seen order, and join counts."""
    pairs: dict[str, tuple[dict, dict]] = {}
    for mode, recs in (("non_thinking", instruct), ("thinking", reasoning)):
        for r in recs:
            rec, answers = pairs.setdefault(prompt_key(r), (r, {"thinking": None, "non_thinking": None}))
            answers[mode] = answers[mode] or r["messages"][-1]
    both = sum(all(a.values()) for _, a in pairs.values())
    return list(pairs.values()), {"prompts": len(pairs), "paired_in_data": both}


def resolve(cfg: DictConfig, field: str) -> Path:
    src = Path(str(cfg[field]))
    if (src / ".metadata").exists():
        return src
    run = Path(cfg.paths.runs) / cfg.model.name / str(cfg[field])
    latest = checkpoints.latest_checkpoint(run)
    if latest is None or not (run / "DONE.json").exists():
        raise FileNotFoundError(f"conf/mod_data.yaml {field}={cfg[field]}: no finished run at {run}")
    return latest


@torch.no_grad()
def fill(cfg: DictConfig, mode: str, todo: list[tuple[dict, dict]], counts: dict) -> None:
    """Generate `mode`'s answer for each (record, answers) in todo; set it where it passes."""
    if not todo:
        return
    ckpt = resolve(cfg, WRITER[mode])
    tok_dir = checkpoint_tokenizer.tokenizer_of(ckpt, cfg.tokenizer_dir)
    tok = checkpoint_tokenizer.load(tok_dir)
    net = kv_decoding.build_inference_model(cfg.model)
    kv_decoding.load_weights(net, ckpt)
    print(f"[mod_data] {mode}: {len(todo)} answers from {ckpt}, tokenizer {checkpoint_tokenizer.describe(tok_dir)}",
          flush=True)
    for s in progress(range(0, len(todo), cfg.batch_size), desc=f"[mod_data] {mode}", unit="batch"):
        chunk = todo[s:s + cfg.batch_size]
        prompts = [chat_data.encode_prompt(tok, r["messages"][:-1], mode, r.get("tools")) for r, _ in chunk]
        outs = kv_decoding.generate(net, prompts, max_new_tokens=cfg.max_new_tokens, eos_id=tok.eos_token_id,
                                    pad_id=tok.pad_token_id, temperature=0.0, generator=torch.Generator())
        for (rec, answers), out in zip(chunk, outs):
            if out.truncated:
                counts[f"dropped: {mode} answer truncated at max_new_tokens"] += 1
                continue
            text = tok.decode(out.tokens[:-1], skip_special_tokens=False)
            ok, why, reasoning, response = rl.split_response(text, mode)
            if not ok:
                counts[f"dropped: {mode} answer malformed ({why})"] += 1
            elif rec.get("task") and rl.correctness(response, rec["task"]) < 1.0:
                counts[f"dropped: {mode} answer incorrect (verifier)"] += 1
            else:
                answers[mode] = {"role": "assistant", "content": response.strip(),
                                 **({"reasoning_content": reasoning.strip()} if mode == "thinking" else {})}
                counts[f"generated: {mode}"] += 1


def run(cfg: DictConfig) -> dict:
    torch.manual_seed(cfg.seed)
    instruct, report_i = chat_data.load_posttrain(cfg.posttrain_data, "sft_instruct")
    reasoning, report_r = chat_data.load_posttrain(cfg.posttrain_data, "sft_reasoning")
    pairs, joined = join(instruct, reasoning)
    counts = Counter({"generated: thinking": 0, "generated: non_thinking": 0})
    limit = int(cfg.max_generate) if cfg.max_generate is not None else None
    for mode in ("thinking", "non_thinking"):
        todo = [(r, a) for r, a in pairs if a[mode] is None]
        if limit is not None and len(todo) > limit:
            counts[f"dropped: {mode} answer over max_generate"] += len(todo) - limit
            todo = todo[:limit]
        fill(cfg, mode, todo, counts)
    out_dir = Path(cfg.run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kept = 0
    tmp = out_dir / "mod.jsonl.tmp"
    with open(tmp, "w") as f:
        for i, (rec, answers) in enumerate(pairs):
            if not all(answers.values()):
                continue
            for mode in ("thinking", "non_thinking"):
                row = {k: v for k, v in rec.items() if k not in ("messages", "id", "references")}
                row.update(id=f"mod-{i}-{mode}", messages=rec["messages"][:-1] + [answers[mode]])
                why = chat_data.check_record(row, mode)
                if why:  # a paired answer that is not a valid turn of its mode: never written
                    raise ValueError(f"mod_data: built an invalid {mode} record {row['id']}: {why}")
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            kept += 1
    tmp.replace(out_dir / "mod.jsonl")
    summary = {"out": str(out_dir / "mod.jsonl"), "pairs_kept": kept, "records": 2 * kept, **joined,
               "counts": dict(counts), "bad_in_sources": {"sft_instruct": report_i["bad"],
                                                          "sft_reasoning": report_r["bad"]}}
    (out_dir / "mod_counts.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


@hydra.main(config_path="../conf", config_name="mod_data", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        print(json.dumps(run(cfg), ensure_ascii=False), flush=True)
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(f"[mod_data] {e}")


if __name__ == "__main__":
    main()
