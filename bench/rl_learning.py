"""Does the RL stage learn? Held-out instruction-following reward and accuracy before and after RL.

    .venv/bin/python bench/rl_learning.py                      # from runs/tiny/mod_sft
    .venv/bin/python bench/rl_learning.py --init runs/tiny/mod_sft --prompts 64 --n 8 stage.budget.tiny.steps=40

Starts from a checkpoint that is weak on the task family the RL data is made of (the IFEval-style
constraints of chat_data.instruction_task; by default the smoke chain's MOD checkpoint), scores it
on held-out instruction prompts only (chat_data.is_heldout keeps them out of the RL pool), runs
stages/rl_train.py through the launcher (2 ranks, its own run dir under --out), scores the result on
the same prompts with the same seeds, and prints per mode and overall: sampled reward, accuracy
and malformed share with bootstrap 95% intervals, the paired-bootstrap interval of after - before,
and the seconds RL took. Trailing key=value arguments are Hydra overrides for the RL stage.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import launcher  # noqa: E402
import rl  # noqa: E402
import tokenizer as tokmod  # noqa: E402
from kit import (
    chat_data,  # noqa: E402
    checkpoints,  # noqa: E402
    config_checks,  # noqa: E402
    kv_decoding,  # noqa: E402
)
from stages import evaluate as ev

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("reward", "accuracy", "malformed")


def score(cfg, net, tok, records, ckpt: Path) -> dict:
    """Sampled figures per mode (evaluate.sampled_figures) of one checkpoint."""
    ev.load_weights(net, ckpt)
    rcfg = rl.RewardConfig(**dict(cfg.reward))
    return {m: ev.sampled_figures(net, tok, records, m, cfg, rcfg) for m in cfg.modes}


def overall(fig: dict, key: str) -> list[float]:
    cols = [fig[m]["sampled_per_prompt"][key] for m in fig]
    return [sum(x) / len(x) for x in zip(*cols)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", default="runs/tiny/mod_sft", help="a finished stage run dir or a DCP checkpoint")
    ap.add_argument("--out", default="runs/bench_rl_learning")
    ap.add_argument("--prompts", type=int, default=64, help="held-out instruction prompts")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt and mode")
    a, overrides = ap.parse_known_args()

    init = Path(a.init)
    if not (init / ".metadata").exists():
        latest = checkpoints.latest_checkpoint(init)
        if latest is None:
            raise SystemExit(f"--init {init}: no checkpoint (run `make post MODEL=tiny` up to mod_sft first)")
        init = latest
    # held-out prompts of the RL task family only, scored like evaluate.py's sampled figure
    ecfg, _ = launcher.compose("evaluate", [f"posttrain_data.sizes.eval={a.prompts}", f"sampled.n={a.n}"], ROOT / "conf")
    ecfg.posttrain_data.mix.eval = dict(ecfg.posttrain_data.mix.rl)  # the RL pool's task family and languages
    tok = tokmod.load_tokenizer(ecfg.tokenizer_dir)
    records, _ = chat_data.load_posttrain(ecfg.posttrain_data, "eval")
    net = kv_decoding.build_inference_model(ecfg.model)

    before = score(ecfg, net, tok, records, init)

    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    rl_over = [f"run_dir={out}/rl", f"stage.init_from={init.resolve()}", *overrides]
    rcfg, rl_over = launcher.compose("rl_train", rl_over, ROOT / "conf")
    launcher.check(rcfg)
    t0 = time.perf_counter()
    if launcher.run_local(ROOT / "stages" / "rl_train.py", rcfg, rl_over) != 0:
        raise SystemExit("RL stage failed (see its log above)")
    seconds = time.perf_counter() - t0
    after = score(ecfg, net, tok, records, checkpoints.latest_checkpoint(out / "rl"))

    def fmt(m, lo, hi, signed=True):
        f = "{:+.3f}" if signed else "{:.3f}"
        return f"{f.format(m)} [{f.format(lo)}, {f.format(hi)}]"

    print(f"\nRL learning bench: {len(records)} held-out instruction prompts x {a.n} samples per mode at "
          f"T={ecfg.sampled.temperature}; init {init}; RL {rcfg.stage.name} x {config_checks.budget(rcfg).steps} steps "
          f"(lr_factor {rcfg.stage.lr_factor}) in {seconds:.0f} s")
    print(f"{'mode':13s} {'metric':9s} {'before [95% CI]':>24s} {'after [95% CI]':>24s} {'after - before (paired)':>26s}")
    rows = {}
    for m in list(ecfg.modes) + ["overall"]:
        for k in KEYS:
            x = overall(before, k) if m == "overall" else before[m]["sampled_per_prompt"][k]
            y = overall(after, k) if m == "overall" else after[m]["sampled_per_prompt"][k]
            b, d, c = (ev.bootstrap_ci(x, 2000, 0), ev.bootstrap_ci(y, 2000, 0), ev.bootstrap_ci(y, 2000, 0, baseline=x))
            rows[f"{m}/{k}"] = {"before": b, "after": d, "diff": c}
            print(f"{m:13s} {k:9s} {fmt(*b, k == 'reward'):>24s} {fmt(*d, k == 'reward'):>24s} {fmt(*c):>26s}")
    (out / "result.json").write_text(json.dumps({"seconds": seconds, "prompts": len(records), "n": a.n,
                                                 "init": str(init), "overrides": overrides, "rows": rows}, indent=2))
    print(f"wrote {out / 'result.json'}")


if __name__ == "__main__":
    main()
