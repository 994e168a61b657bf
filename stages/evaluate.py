"""Mode-control evaluation of checkpoints (issue 4): config -> checkpoints -> generate -> score.

    python stages/evaluate.py                  # base, instruct, reasoning, merged, MOD, RL rows
    python stages/evaluate.py endpoint=http://127.0.0.1:8000   # a served model (make serve), same table
    python stages/evaluate.py --cfg job --resolve   # prints the fully composed config, runs nothing

For each checkpoint and each requested mode, held-out prompts end with that mode's control tag
(x + <think> / x + </think>, paper 4.4) and are decoded greedily with the KV cache. Columns:
well-formed share (rl.split_response), mode-obeyed share (rl.mode_obeyed), task accuracy
(rl verifiers), mean generated tokens, mean reward (the RL reward), and the held-out NLL of the
reference answer in that mode. Beside the greedy figures, a sampled one per mode (`sampled.n`
samples per prompt at the RL temperature): mean reward, accuracy and malformed share with
bootstrap 95% intervals over prompts; the per-prompt means go to metrics.json so the smoke report
can compare checkpoints with a paired bootstrap. No process group: checkpoints load straight from DCP.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import warnings
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import rl
from kit import chat_data, checkpoint_tokenizer, checkpoints, kv_decoding, preflight, training
from kit.kv_decoding import load_weights  # noqa: F401  (bench/rl_learning.py calls evaluate.load_weights)
from kit.openai_client import Endpoint, EndpointError
from kit.progress_bar import progress

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def resolve(cfg: DictConfig, label: str, src: str) -> Path:
    p = Path(src)
    if (p / ".metadata").exists():
        return p
    run = Path(cfg.paths.runs) / cfg.model.name / src
    latest = checkpoints.latest_checkpoint(run)
    if latest is None or not (run / "DONE.json").exists():
        raise FileNotFoundError(f"conf/evaluate.yaml checkpoints.{label}={src}: no finished run at {run}")
    return latest


def decode(net):
    """The kit's KV-cached decoder for a checkpoint, the server's completions for an endpoint."""
    return net.complete if isinstance(net, Endpoint) else functools.partial(kv_decoding.generate, net)


@torch.no_grad()
def heldout_nll(net, tok, records: list[dict], mode: str) -> float:
    """Mean per-token NLL of the reference answer (response tokens only) in `mode`."""
    total, count = 0.0, 0
    for r in records:
        ref = r.get("references", {}).get(mode)
        if ref is None:
            continue
        ids, labels = chat_data.encode_chat(tok, r["messages"] + [ref], r.get("tools"))
        y = torch.tensor(labels[1:])
        keep = y != chat_data.IGNORE_INDEX
        if isinstance(net, Endpoint):  # the server's log p(ids[i] | ids[:i]) (echo + logprobs)
            total -= float(torch.tensor(net.prompt_logprobs(ids))[keep].sum())
        else:
            device = net.tok_embeddings.weight.device
            y, keep = y.to(device), keep.to(device)
            x = torch.tensor([ids[:-1]], device=device)
            pos = torch.arange(x.shape[1], device=device)[None]
            logits = net(x, pos, net.get_attention_masks(pos))
            logits = logits[0] if isinstance(logits, list) else logits
            total += float(torch.nn.functional.cross_entropy(logits[0][keep].float(), y[keep], reduction="sum"))
        count += int(keep.sum())
    return total / count if count else float("nan")


def bootstrap_ci(values, n_boot: int, seed: int, baseline=None, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-prompt `values` and its percentile bootstrap interval, resampling prompts.
    With `baseline` (the same prompts scored on another checkpoint) it is the paired bootstrap
    of the mean difference values - baseline: one resample of prompts serves both checkpoints,
    so prompt difficulty cancels and only the checkpoints' difference is left to vary."""
    x = torch.as_tensor(values, dtype=torch.float64)
    if baseline is not None:
        x = x - torch.as_tensor(baseline, dtype=torch.float64)
    idx = torch.randint(len(x), (n_boot, len(x)), generator=torch.Generator().manual_seed(seed))
    means = x[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return float(x.mean()), lo, hi


def sampled_figures(net, tok, records: list[dict], mode: str, cfg: DictConfig, rcfg) -> dict:
    """Per-prompt means over `sampled.n` samples at the RL temperature (with the RL budget of new
    tokens), and their bootstrap intervals: what the policy RL trains actually does, with a
    figure of its noise. Greedy rows can move by ~0.1 between settings that sample alike."""
    sc = cfg.sampled
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    per = {"reward": [], "accuracy": [], "malformed": []}
    step = max(1, sc.batch_rows // sc.n)  # prompts per generate call (a wide batch costs little more per token)
    for s in range(0, len(records), step):
        chunk = records[s:s + step]
        prompts = [chat_data.encode_prompt(tok, r["messages"], mode, r.get("tools")) for r in chunk for _ in range(sc.n)]
        outs = decode(net)(prompts, max_new_tokens=sc.max_new_tokens, eos_id=tok.eos_token_id,
                            pad_id=tok.pad_token_id, temperature=sc.temperature, generator=gen)
        for j, r in enumerate(chunk):
            rews = []
            for out in outs[j * sc.n:(j + 1) * sc.n]:
                text = tok.decode(out.tokens if out.truncated else out.tokens[:-1], skip_special_tokens=False)
                rews.append(rl.reward(text, mode, r["task"], len(out.tokens), rcfg))
            per["reward"].append(sum(x.total for x in rews) / sc.n)
            per["accuracy"].append(sum(x.accuracy for x in rews) / sc.n)
            per["malformed"].append(sum(not x.well_formed for x in rews) / sc.n)
    out = {"sampled_n": sc.n, "sampled_temperature": sc.temperature, "sampled_per_prompt": per}
    for key, vals in per.items():
        m, lo, hi = bootstrap_ci(vals, sc.bootstrap, cfg.seed)
        out[f"sampled_{key}"], out[f"sampled_{key}_ci"] = m, [lo, hi]
    return out


def evaluate_checkpoint(net, tok, records: list[dict], cfg: DictConfig, sampled: bool = False) -> tuple[dict, list]:
    rcfg = rl.RewardConfig(**OmegaConf.to_container(cfg.reward))
    row, samples = {}, []
    gen = torch.Generator().manual_seed(cfg.seed)
    for mode in cfg.modes:
        outs = []
        for s in range(0, len(records), cfg.batch_size):
            chunk = records[s:s + cfg.batch_size]
            outs += decode(net)([chat_data.encode_prompt(tok, r["messages"], mode, r.get("tools")) for r in chunk],
                                max_new_tokens=cfg.max_new_tokens, eos_id=tok.eos_token_id,
                                pad_id=tok.pad_token_id, temperature=cfg.temperature, generator=gen)
        scores = []
        for r, out in zip(records, outs):
            text = tok.decode(out.tokens if out.truncated else out.tokens[:-1], skip_special_tokens=False)
            rew = rl.reward(text, mode, r["task"], len(out.tokens), rcfg)
            scores.append((rew, rl.mode_obeyed(text, mode), len(out.tokens)))
            if len(samples) < cfg.samples_per_row * (cfg.modes.index(mode) + 1):
                samples.append({"mode": mode, "prompt": r["messages"][-1]["content"], "output": text,
                                "well_formed": rew.well_formed, "reason": rew.reason, "reward": rew.total})
        n = len(scores)
        row[mode] = {"n": n,
                     "well_formed": sum(s[0].well_formed for s in scores) / n,
                     "mode_obeyed": sum(s[1] for s in scores) / n,
                     "accuracy": sum(s[0].accuracy for s in scores) / n,
                     # per domain (Table 3's rows: Math, Instruction Following, Tool-use, ...)
                     "accuracy_by_domain": {d: sum(s[0].accuracy for s, r in zip(scores, records) if r["domain"] == d)
                                            / sum(r["domain"] == d for r in records)
                                            for d in sorted({r["domain"] for r in records})},
                     "mean_tokens": sum(s[2] for s in scores) / n,
                     "reward": sum(s[0].total for s in scores) / n,
                     "heldout_nll": heldout_nll(net, tok, records, mode)}
        if sampled:
            row[mode].update(sampled_figures(net, tok, records, mode, cfg, rcfg))
    return row, samples


def run(cfg: DictConfig) -> dict:
    if (refusal := preflight.replaced_result("evaluate", cfg)) is not None:  # before any loading
        raise FileExistsError(refusal)
    torch.manual_seed(cfg.seed)
    # one process: every core this process may run on (torchrun starts it with OMP_NUM_THREADS=1)
    torch.set_num_threads(cfg.num_threads or len(os.sched_getaffinity(0)))
    tok = checkpoint_tokenizer.load(cfg.tokenizer_dir)  # an endpoint's; a checkpoint brings its own below
    records, report = chat_data.load_posttrain(cfg.posttrain_data, "eval")
    net = kv_decoding.build_inference_model(cfg.model, training.device_of(cfg))  # evaluate.yaml `device`
    out_dir = Path(cfg.run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, all_samples = {}, []
    # evaluate.endpoint=http://host:port scores an OpenAI-compatible server (make serve) instead
    targets = {"endpoint": cfg.endpoint} if cfg.get("endpoint") else cfg.checkpoints
    for label, src in progress(list(targets.items()), desc="[evaluate] checkpoints", unit="ckpt"):
        if cfg.get("endpoint"):
            model, ckpt = Endpoint(src, api_key_env=cfg.endpoint_api_key_env, tokenizer=tok), src
        else:
            ckpt, model = resolve(cfg, label, src), net
            load_weights(net, ckpt)
            tok_dir = checkpoint_tokenizer.tokenizer_of(ckpt, cfg.tokenizer_dir)  # the ids it was trained on
            tok = checkpoint_tokenizer.load(tok_dir)
            print(f"[evaluate] {label}: tokenizer {checkpoint_tokenizer.describe(tok_dir)}", flush=True)
        rows[label], samples = evaluate_checkpoint(model, tok, records, cfg,
                                                   sampled=cfg.sampled.n > 0 and label in cfg.sampled.checkpoints)
        rows[label]["checkpoint"] = str(ckpt)
        rows[label]["tokenizer_sha256"] = checkpoint_tokenizer.tokenizer_hash(tok_dir) if not cfg.get("endpoint") else None
        all_samples += [{"checkpoint": label, **s} for s in samples]
        line = "  ".join(f"{m}: wf {v['well_formed']:.2f} obey {v['mode_obeyed']:.2f} acc {v['accuracy']:.2f} "
                         f"tok {v['mean_tokens']:.1f} R {v['reward']:+.2f} nll {v['heldout_nll']:.2f}"
                         + (f" | sampled R {v['sampled_reward']:+.2f} [{v['sampled_reward_ci'][0]:+.2f}, "
                            f"{v['sampled_reward_ci'][1]:+.2f}] malformed {v['sampled_malformed']:.2f}"
                            if "sampled_reward" in v else "")
                         for m, v in rows[label].items() if isinstance(v, dict))
        print(f"[evaluate] {label:9s} {line}", flush=True)
    result = {"prompts": len(records), "prompt_domains": [r["domain"] for r in records], "data": report, "max_new_tokens": cfg.max_new_tokens,
              "temperature": cfg.temperature, "rows": rows}
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    with (out_dir / "samples.jsonl").open("w") as f:
        for s in all_samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    if any(math.isnan(v["heldout_nll"]) for r in rows.values() for v in r.values() if isinstance(v, dict)):
        print("[evaluate] note: some rows have no reference answers (held-out NLL is nan)", flush=True)
    return result


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (FileNotFoundError, FileExistsError, KeyError, EndpointError) as e:
        sys.exit(f"[evaluate] {e}")


if __name__ == "__main__":
    main()
