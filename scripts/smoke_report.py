"""Write runs/smoke/report.md (+ loss_curves.png) from what the smoke chain measured.

    python scripts/smoke_report.py --runs runs --model tiny --out runs/smoke/report.md --start-file runs/smoke/start

One table row per checkpoint (base, instruct, reasoning, merged, MOD, RL) from
runs/<model>/evaluate/metrics.json, the issue's claims checked against those numbers (each says
whether it holds; nothing is tuned to make it hold), and the training curves of every stage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages import report  # noqa: E402  the plotting code of `make report`

PRETRAIN = ["pretrain_s1", "pretrain_s2", "pretrain_s3_16k", "pretrain_s3_32k"]
SFT = ["sft_instruct", "sft_reasoning", "mod_sft"]
COLS = [("well_formed", "well-formed", "{:.2f}"), ("mode_obeyed", "obeyed mode", "{:.2f}"),
        ("accuracy", "accuracy", "{:.2f}"), ("mean_tokens", "mean tokens", "{:.1f}"),
        ("reward", "mean reward", "{:+.2f}"), ("heldout_nll", "held-out NLL", "{:.3f}")]


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


def claims(rows: dict) -> list[str]:
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
            if label in rows:
                say(errors(rows[label]) < errors(rows["merged"]),
                    f"{label} has fewer mode/format errors than merged: {errors(rows[label]):.1%} vs "
                    f"{errors(rows['merged']):.1%} malformed outputs (mean over modes)")
    if "MOD" in rows and "RL" in rows:
        say(mean_over_modes(rows["RL"], "reward") > mean_over_modes(rows["MOD"], "reward"),
            f"RL's mean reward is above MOD's: {mean_over_modes(rows['RL'], 'reward'):+.3f} vs "
            f"{mean_over_modes(rows['MOD'], 'reward'):+.3f} (mean over modes, held-out prompts, greedy)")
    return out


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
    plot(root, out.with_name("loss_curves.png"))

    modes = [m for m in next(iter(rows.values())) if isinstance(next(iter(rows.values()))[m], dict)]
    head = "| checkpoint | " + " | ".join(f"{m} {c[1]}" for m in modes for c in COLS) + " |"
    lines = [head, "|" + "---|" * (1 + len(modes) * len(COLS))]
    for label, r in rows.items():
        lines.append(f"| {label} | " + " | ".join(c[2].format(r[m][c[0]]) for m in modes for c in COLS) + " |")
    elapsed = ""
    if a.start_file and Path(a.start_file).exists():
        secs = time.time() - float(Path(a.start_file).read_text().strip())
        elapsed = f"Wall time of the chain (tokenizer -> pre-training -> post-training -> this report): **{secs / 60:.1f} min**.\n\n"
    samples = read_jsonl(root / "evaluate" / "samples.jsonl")
    ex = "\n".join(f"- {s['checkpoint']} / {s['mode']}: `{s['output'][:120]!r}` ({'ok' if s['well_formed'] else s['reason']})"
                   for s in samples if s["checkpoint"] in ("merged", "MOD", "RL"))[:4000]
    text = (f"# Smoke report ({a.model})\n\n{elapsed}"
            f"Held-out prompts: {ev['prompts']} (never trained on), each asked in both modes (prompt + `<think>` / "
            f"prompt + `</think>`, paper 4.4); greedy decoding, at most {ev['max_new_tokens']} new tokens. "
            "well-formed: the format reward is 0 (rl.split_response); obeyed mode: thinking closed a non-empty think "
            "block / non-thinking emitted no think tag; accuracy: share of the task's verifiers passed (0 when malformed); "
            "mean reward: R_correct + R_format + overlong shaping as in RL; held-out NLL: reference answer of that mode.\n\n"
            + "\n".join(lines) + "\n\n## Claims (measured)\n\n" + "\n".join(claims(rows))
            + "\n\n## Curves\n\n![loss curves](loss_curves.png)\n\n## Sample outputs (merged, MOD, RL)\n\n" + ex + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
