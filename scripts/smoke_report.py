"""Write runs/smoke/report.md (+ training_curves.png) from what the smoke chain measured.

    python scripts/smoke_report.py --runs runs --model tiny --out runs/smoke/report.md --start-file runs/smoke/start

One table row per checkpoint (base, instruct, reasoning, merged, MOD, RL) from
runs/<model>/evaluate/metrics.json, the issue's claims checked against those numbers (each says
whether it holds; nothing is tuned to make it hold), and the training curves of every stage.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from stages import report  # the plotting code of `make report`
from stages.evaluate import bootstrap_ci

PRETRAIN = ["pretrain_s1", "pretrain_s2", "pretrain_s3_16k", "pretrain_s3_32k"]
SFT = ["sft_instruct", "sft_reasoning", "mod_sft"]
COLS = [("well_formed", "well-formed", "{:.2f}"), ("mode_obeyed", "obeyed mode", "{:.2f}"),
        ("accuracy", "accuracy", "{:.2f}"), ("mean_tokens", "mean tokens", "{:.1f}"),
        ("reward", "mean reward", "{:+.2f}"), ("heldout_nll", "held-out NLL", "{:.3f}"),
        ("sampled_reward", "sampled reward [95% CI]", "ci"), ("sampled_accuracy", "sampled accuracy", "ci"),
        ("sampled_malformed", "sampled malformed", "ci")]
BOOT, SEED = 2000, 0  # paired-bootstrap resamples of the held-out prompts for the claims


def cell(v: dict, key: str, fmt: str) -> str:
    if key not in v:
        return "-"
    if fmt != "ci":
        return fmt.format(v[key])
    lo, hi = v[f"{key}_ci"]
    return f"{v[key]:+.2f} [{lo:+.2f}, {hi:+.2f}]" if key == "sampled_reward" else f"{v[key]:.2f} [{lo:.2f}, {hi:.2f}]"


def per_prompt(row: dict, key: str) -> list[float] | None:
    """Per-prompt sampled means of `key` averaged over modes (prompts are the same in every row)."""
    modes = [v for v in row.values() if isinstance(v, dict)]
    if not all("sampled_per_prompt" in v for v in modes):
        return None
    cols = [v["sampled_per_prompt"][key] for v in modes]
    return [sum(x) / len(x) for x in zip(*cols)]


def paired(rows: dict, a: str, b: str, key: str, keep: list[bool] | None = None) -> tuple[float, float, float] | None:
    """Mean over prompts (those where `keep` is true, if given) of a - b for the sampled `key` (mean
    over modes), with its paired bootstrap 95% interval; None when either row has no sampled figures."""
    x, y = per_prompt(rows[a], key), per_prompt(rows[b], key)
    if x is None or y is None:
        return None
    if keep is not None:
        x, y = [v for v, k in zip(x, keep) if k], [v for v, k in zip(y, keep) if k]
    return bootstrap_ci(x, BOOT, SEED, baseline=y)


def rl_by_domain(rows: dict, domains: list[str]) -> list[str]:
    """RL - MOD sampled reward per domain: RL trains on instruction following only (paper 4.1), so
    its gain there and its drift elsewhere are read apart."""
    if not domains or "RL" not in rows or "MOD" not in rows or paired(rows, "RL", "MOD", "reward") is None:
        return []
    lines = ["| domain | prompts | RL - MOD sampled reward [95% CI] |", "|---|---|---|"]
    for d in sorted(set(domains)):
        diff, lo, hi = paired(rows, "RL", "MOD", "reward", [x == d for x in domains])
        lines.append(f"| {d} | {domains.count(d)} | {diff:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    return lines


def read_jsonl(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def plot(run_root: Path, out_png: Path) -> None:
    """The chain's curves, drawn by stages/report.py (the figure `make report` draws for one run)."""
    report.plot_rows([("pre-training", [(s, report.read_metrics(run_root / s)) for s in PRETRAIN], True),
                      ("SFT", [(s, report.read_metrics(run_root / s)) for s in SFT], False),
                      ("RL", [("rl", report.read_metrics(run_root / "rl"))], False)], out_png)


def errors(row: dict) -> float:
    """Mode/format errors: the share of outputs that were not well formed, averaged over modes."""
    modes = [v for v in row.values() if isinstance(v, dict)]
    return sum(1 - v["well_formed"] for v in modes) / len(modes)


def mean_over_modes(row: dict, key: str) -> float:
    modes = [v for v in row.values() if isinstance(v, dict)]
    return sum(v[key] for v in modes) / len(modes)


def claims(rows: dict, domains: list[str]) -> list[str]:
    """The claims checked against the evaluation; `domains` is each held-out prompt's domain."""
    out = []

    def say(ok: bool, text: str):
        out.append(f"- **{'holds' if ok else 'does not hold'}**: {text}")
    if "instruct" in rows:
        d, t = rows["instruct"]["non_thinking"], rows["instruct"].get("thinking", {})
        say(d["mode_obeyed"] >= 0.9 and d["well_formed"] >= 0.9,
            f"instruct SFT answers directly in non-thinking mode: {d['mode_obeyed']:.0%} emit no think tag, "
            f"{d['well_formed']:.0%} well formed, {d['mean_tokens']:.1f} tokens on average"
            + (f" (its thinking-mode outputs are well formed {t['well_formed']:.0%} of the time: it never learnt the think block)" if t else ""))
    if "reasoning" in rows:
        t = rows["reasoning"]["thinking"]
        say(t["well_formed"] >= 0.9, f"reasoning SFT emits well-formed think blocks: {t['well_formed']:.0%} of thinking-mode "
            f"outputs well formed ({t['mean_tokens']:.1f} tokens)")
    if "merged" in rows:
        for label in ("MOD", "RL"):
            if label not in rows:
                continue
            d = paired(rows, label, "merged", "malformed")
            if d is not None:
                say(d[2] < 0, f"{label} has fewer mode/format errors than merged: sampled malformed share "
                    f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] vs merged (paired bootstrap 95% interval over prompts, "
                    f"mean over modes; greedy: {errors(rows[label]):.1%} vs {errors(rows['merged']):.1%})")
            else:  # merged has greedy figures only (evaluate.yaml sampled.checkpoints)
                say(errors(rows[label]) < errors(rows["merged"]),
                    f"{label} has fewer mode/format errors than merged: {errors(rows[label]):.1%} vs "
                    f"{errors(rows['merged']):.1%} malformed outputs (greedy, mean over modes; no interval)")
    if "MOD" in rows and "RL" in rows:
        d = paired(rows, "RL", "MOD", "reward")
        if d is not None:
            say(d[1] > 0, f"RL's sampled held-out reward is above MOD's: difference {d[0]:+.3f} "
                f"[{d[1]:+.3f}, {d[2]:+.3f}] (paired bootstrap 95% interval over prompts, mean over modes; "
                f"greedy {mean_over_modes(rows['RL'], 'reward'):+.3f} vs {mean_over_modes(rows['MOD'], 'reward'):+.3f})")
        if "Instruction Following" in domains:
            d = paired(rows, "RL", "MOD", "reward", [x == "Instruction Following" for x in domains])
            if d is not None:
                say(d[1] > 0, f"on instruction-following prompts (RL's only training domain, paper 4.1) RL's sampled "
                    f"reward is above MOD's: difference {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] "
                    f"({domains.count('Instruction Following')} prompts)")
        d = paired(rows, "RL", "MOD", "accuracy")
        if d is not None:
            say(d[1] > 0, f"RL's sampled held-out accuracy is above MOD's: difference {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]")
        d = paired(rows, "RL", "MOD", "malformed")
        if d is not None:
            say(d[0] <= 0, f"RL's malformed outputs are no more frequent than MOD's: sampled malformed share "
                f"difference {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]")
        nll = {m: (rows["RL"][m]["heldout_nll"], rows["MOD"][m]["heldout_nll"]) for m in rows["RL"]
               if isinstance(rows["RL"][m], dict)}
        say(all(r <= 1.1 * b for r, b in nll.values()),
            "RL's held-out NLL is at most 10% above MOD's: " + ", ".join(
                f"{m} {r:.3f} vs {b:.3f} ({r / b - 1:+.1%})" for m, (r, b) in nll.items()))
    return out


def domain_table(rows: dict) -> list[str]:
    """Greedy accuracy per domain and mode (Table 3's rows: Math, Instruction Following, Tool-use)."""
    modes = [m for m, v in next(iter(rows.values())).items() if isinstance(v, dict) and "accuracy_by_domain" in v]
    if not modes:
        return []
    domains = sorted({d for r in rows.values() for m in modes for d in r[m]["accuracy_by_domain"]})
    lines = ["| checkpoint | " + " | ".join(f"{d} {m}" for d in domains for m in modes) + " |",
             "|" + "---|" * (1 + len(domains) * len(modes))]
    for label, r in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{r[m]['accuracy_by_domain'][d]:.2f}" if d in r[m]["accuracy_by_domain"]
                                                  else "-" for d in domains for m in modes) + " |")
    return lines


def sampled_note(rows: dict) -> str:
    v = next((v for r in rows.values() for v in r.values() if isinstance(v, dict) and "sampled_n" in v), None)
    if v is None:
        return "no sampled figures in this evaluation"
    return (f"{v['sampled_n']} samples per prompt at temperature {v['sampled_temperature']} (the RL "
            "temperature and token budget), per-prompt means, bootstrap 95% interval over prompts in brackets")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--out", default="runs/smoke/report.md")
    ap.add_argument("--start-file", default=None, help="file holding the chain's start time (epoch seconds)")
    a = ap.parse_args()
    root = Path(a.runs) / a.model
    mpath = root / "evaluate" / "metrics.json"
    if not mpath.exists():
        raise SystemExit(f"{mpath} not found: run stages/evaluate.py first")
    ev = json.loads(mpath.read_text())
    rows = ev["rows"]
    out = Path(a.out)
    plot(root, out.with_name("training_curves.png"))

    modes = [m for m in next(iter(rows.values())) if isinstance(next(iter(rows.values()))[m], dict)]
    head = "| checkpoint | " + " | ".join(f"{m} {c[1]}" for m in modes for c in COLS) + " |"
    lines = [head, "|" + "---|" * (1 + len(modes) * len(COLS))]
    for label, r in rows.items():
        lines.append(f"| {label} | " + " | ".join(cell(r[m], c[0], c[2]) for m in modes for c in COLS) + " |")
    elapsed, secs = "", None
    if a.start_file and Path(a.start_file).exists():
        secs = time.time() - float(Path(a.start_file).read_text().strip())
        elapsed = f"Wall time of the chain (tokenizer -> pre-training -> post-training -> this report): **{secs / 60:.1f} min**.\n\n"
    samples = read_jsonl(root / "evaluate" / "samples.jsonl")
    ex = "\n".join(f"- {s['checkpoint']} / {s['mode']}: `{s['output'][:120]!r}` "
                   f"({'well formed' if s['well_formed'] else 'malformed: ' + s['reason']}; reward {s['reward']:+.2f})"
                   for s in samples if s["checkpoint"] in ("merged", "MOD", "RL"))[:4000]
    domains = ev.get("prompt_domains", [])
    verdicts = claims(rows, domains)
    text = (f"# Smoke report ({a.model})\n\n{elapsed}"
            f"Held-out prompts: {ev['prompts']} (never trained on), each asked in both modes (prompt + `<think>` / "
            f"prompt + `</think>`, paper 4.4); greedy decoding, at most {ev['max_new_tokens']} new tokens. "
            "well-formed: the format reward is 0 (rl.split_response); obeyed mode: thinking closed a non-empty think "
            "block / non-thinking emitted no think tag; accuracy: share of the task's verifiers passed (0 when malformed); "
            "mean reward: R_correct + R_format + overlong shaping as in RL; held-out NLL: reference answer of that mode. "
            f"sampled: {sampled_note(rows)}; a claim comparing checkpoints holds only when the paired-bootstrap "
            "95% interval of the difference excludes zero.\n\n"
            + "\n".join(lines)
            + "\n\n## Accuracy by domain (Table 3's rows; greedy, the verifier of each task: exact answer, "
            "instruction checks, the tool call's result)\n\n" + "\n".join(domain_table(rows))
            + "\n\n" + "\n".join(rl_by_domain(rows, domains))
            + "\n\n## Claims (measured)\n\n" + "\n".join(verdicts)
            + "\n\n## Curves\n\n![training curves](training_curves.png)\n\n## Sample outputs (merged, MOD, RL)\n\n"
            "The first held-out prompts, greedy. Well formed means the mode's format is right, not that the answer "
            "is correct: the reward says that (a right, well-formed answer scores about +1; the tiny model is "
            "mostly wrong).\n\n" + ex + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    # the console's last line: the verdict, the chain's time, where to look
    held = sum(v.startswith("- **holds**") for v in verdicts)
    took = f"; the chain took {secs / 60:.1f} min" if secs is not None else ""
    print(f"smoke: {held} of {len(verdicts)} claims hold{took}; report {out}, picture {out.with_name('training_curves.png')}")


if __name__ == "__main__":
    main()
