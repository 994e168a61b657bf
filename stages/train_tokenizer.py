"""Hydra stage: train the tokenizer (`make tokenizer`) or write the Table 6 report (`make tokenizer-report`).

  python stages/train_tokenizer.py                      # tiny: artifacts/tokenizer/tiny/
  python stages/train_tokenizer.py tokenizer=axk1       # 163,840-token tokenizer from your corpora
  python stages/train_tokenizer.py mode=report          # ours vs an unbalanced baseline, paper 5.4
  python stages/train_tokenizer.py tokenizer=axk1 --cfg job --resolve   # prints the fully composed config, runs nothing
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

# This script's own name would shadow the top-level tokenizer module: put the repo root first.
import hydra
from omegaconf import DictConfig, OmegaConf

import tokenizer as tk
from data import iter_source


def _train(cfg: DictConfig, *, balanced: bool, out_dir: str, label: str):
    t = cfg.tokenizer
    tk.check_vocab_size(t.vocab_size)  # fail before streaming anything
    sources = OmegaConf.to_container(t.sources, resolve=True)
    t0 = time.time()
    docs = tk.mixture_stream(sources, int(float(t.budget_mb) * 1e6), cfg.seed, balanced=balanced,
                             heldout_every=int(cfg.report.heldout_every))
    tok = tk.train_tokenizer(docs, vocab_size=int(t.vocab_size), min_frequency=int(t.min_frequency), label=label,
                             total_bytes=int(float(t.budget_mb) * 1e6))
    cfg_hash = hashlib.sha256(json.dumps(OmegaConf.to_container(t, resolve=True), sort_keys=True).encode()).hexdigest()
    out = tk.save_tokenizer(tok, out_dir, model_max_length=int(t.model_max_length),
                            extra={"name": t.name, "balanced": balanced, "config_sha256": cfg_hash,
                                   "seed": cfg.seed, "train_seconds": round(time.time() - t0, 1)})
    print(f"[{label}] vocab {tok.get_vocab_size()} saved to {out} in {time.time() - t0:.1f}s", flush=True)
    return tok


def _report(cfg: DictConfig) -> None:
    t = cfg.tokenizer
    ours_dir = Path(cfg.out_dir)
    ours = tk.load_raw_tokenizer(ours_dir) if (ours_dir / "tokenizer.json").is_file() else \
        _train(cfg, balanced=True, out_dir=str(ours_dir), label="ours")
    base = _train(cfg, balanced=False, out_dir=cfg.report.baseline_dir, label="baseline")
    for tok in (ours, base):
        tok.encode_special_tokens = True  # measure text, never let "<think>" in docs become one id
    sources = OmegaConf.to_container(t.sources, resolve=True)
    rows = []
    for name, src in sources.items():
        docs = list(tk.split_heldout(iter_source(src), int(cfg.report.heldout_every), heldout=True))
        if not docs:
            continue
        n_o = [len(e.ids) for e in ours.encode_batch(docs, add_special_tokens=False)]
        n_b = [len(e.ids) for e in base.encode_batch(docs, add_special_tokens=False)]
        nbytes = sum(len(d.encode("utf-8")) for d in docs)
        rows.append((name, src.get("lang", "?"), len(docs), sum(n_o) / len(docs), sum(n_b) / len(docs),
                     nbytes / sum(n_o), nbytes / sum(n_b)))
    head = (f"Average tokens per held-out document (lower is better; paper Table 6 measure). "
            f"vocab {t.vocab_size}, same {t.budget_mb} MB training budget; baseline = natural "
            f"source proportions (no multilingual balancing).\n\n"
            "| dataset | lang | docs | ours (balanced) | baseline | ours bytes/token | baseline bytes/token |\n"
            "|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {n} | {l} | {d} | {o:.2f} | {b:.2f} | {ob:.2f} | {bb:.2f} |\n" for n, l, d, o, b, ob, bb in rows)
    Path(cfg.report.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.report.out).write_text(head + body)
    print(head + body + f"\nwritten to {cfg.report.out}", flush=True)


@hydra.main(config_path="../conf", config_name="train_tokenizer", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if cfg.get("mode", "train") == "report":
        _report(cfg)
    else:
        _train(cfg, balanced=True, out_dir=cfg.out_dir, label="tokenizer")


if __name__ == "__main__":
    main()
