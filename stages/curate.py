"""Hydra stage: curate, mix, tokenize and pack the pre-training data of the three stages (paper 3.1).

  python stages/curate.py                 # tiny: artifacts/data/tiny/pretrain_s{1,2,3}/
  python stages/curate.py data=axk1       # cluster config (see conf/data/axk1.yaml)

Steps: read sources (bad records counted per reason) -> heuristic filters -> exact + near dedup
-> model quality filter -> domain classifier -> difficulty scorer -> per-stage domain-aware mixture
(Appendix B.1 weights, upsampling) -> curriculum order (easy to hard) -> tokenize -> packed shards
+ manifest.json (the audit trail: source counts, drops per reason, tokens per category, hashes).
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

import data as D
import tokenizer as tk


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_sources(sources: dict, audit: dict) -> list[dict]:
    docs = []
    for name, src in sources.items():
        st = {"docs": 0, "bytes": 0}
        for rec in D.iter_records({"name": name, **src}, st):
            st["docs"] += 1
            st["bytes"] += len(rec["text"].encode("utf-8", "surrogatepass"))
            docs.append(rec)
        audit["sources"][name] = st
        for reason, n in st.get("bad", {}).items():
            audit["bad_records"][reason] = audit["bad_records"].get(reason, 0) + n
        audit["bad_examples"] += st.get("bad_examples", [])
        print(f"[curate] source {name}: {st['docs']} docs, {st['bytes'] / 1e6:.2f} MB, bad {st.get('bad', {})}", flush=True)
    return docs


def mix_stage(docs: list[dict], weights: dict, target_tokens: int, seed: int, stage: str) -> tuple[list[dict], dict]:
    """Samples documents per category to hit weight * target tokens, upsampling small pools.

    Whole documents are drawn (without replacement first, then repeated passes in a fresh random
    order); a document longer than twice the remaining deficit is skipped, so a category's share
    ends within about one short document of its target.
    """
    rng = np.random.default_rng([seed, D.STAGES.index(stage)])
    pools: dict[str, list[dict]] = {}
    for d in docs:
        pools.setdefault(d["category"], []).append(d)
    wanted = {c: float(w) for c, w in weights.items() if float(w) > 0}
    missing = [c for c in wanted if c not in pools]
    if missing:
        raise SystemExit(f"[curate] {stage}: categories {missing} have weight > 0 but no documents; "
                         f"add a source for them or set their weight to 0 in conf/data/mixture")
    wsum = sum(wanted.values())
    chosen, report = [], {}
    for c, w in wanted.items():
        pool, quota = pools[c], target_tokens * w / wsum
        got, picked, took = 0, 0, True
        while got < quota and took:  # each pass is a fresh random order: upsampling repeats docs evenly
            took = False
            for i in rng.permutation(len(pool)):
                deficit = quota - got
                if deficit <= 0:
                    break
                if pool[i]["n_tokens"] > 2 * deficit:  # would overshoot by more than it fills
                    continue
                chosen.append(pool[i])
                got += pool[i]["n_tokens"]
                picked += 1
                took = True
        report[c] = {"weight_pct": w * 100 / wsum, "target_tokens": int(quota), "tokens": int(got),
                     "docs": picked, "pool_docs": len(pool),
                     "upsample": round(got / max(1, sum(d["n_tokens"] for d in pool)), 3)}
    total = sum(r["tokens"] for r in report.values())
    for r in report.values():
        r["realised_pct"] = round(100 * r["tokens"] / total, 3)
    return chosen, report


def curriculum_order(docs: list[dict], seed: int, buckets: int) -> list[dict]:
    # Easy -> hard (paper 3.1): sort by difficulty bucket, random order inside a bucket so that
    # sources do not come in long runs.
    rng = np.random.default_rng(seed)
    keys = rng.random(len(docs))
    order = sorted(range(len(docs)), key=lambda i: (min(buckets - 1, int(docs[i]["difficulty"] * buckets)), keys[i]))
    return [docs[i] for i in order]


def write_stage(out: Path, docs: list[dict], tok_ids: dict, *, eos_id: int, vocab_size: int,
                shard_tokens: int) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard_*.npy"):
        old.unlink()
    dtype = np.uint16 if vocab_size <= 65536 else np.uint32
    shards, buf, n_docs = [], [], 0

    def flush():
        nonlocal buf, n_docs
        arr = np.concatenate(buf).astype(dtype)
        f = out / f"shard_{len(shards):05d}.npy"
        np.save(f, arr)
        shards.append({"file": f.name, "tokens": int(len(arr)), "docs": n_docs, "sha256": _sha256_file(f)})
        buf, n_docs = [], 0

    size = 0
    for d in docs:
        buf.append(np.asarray(tok_ids[d["id"]] + [eos_id], dtype=np.int64))
        size += len(buf[-1])
        n_docs += 1
        if size >= shard_tokens:
            flush()
            size = 0
    if buf:
        flush()
    return shards


@hydra.main(config_path="../conf", config_name="curate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    t0 = time.time()
    dc = cfg.data
    tok = tk.load_raw_tokenizer(dc.tokenizer_dir)
    tok.encode_special_tokens = True  # "<|eos|>" inside a document is text, never a separator
    eos_id = tok.token_to_id(tk.EOS)
    audit = {"sources": {}, "bad_records": {}, "bad_examples": [], "drops": {}}
    docs = read_sources(OmegaConf.to_container(dc.sources, resolve=True), audit)
    for i, d in enumerate(docs):
        d["id"] = i

    # Tokenize every surviving document once; stages reuse the ids (upsampled docs included).
    enc = tok.encode_batch([d["text"] for d in docs], add_special_tokens=False)
    tok_ids = {d["id"]: e.ids for d, e in zip(docs, enc)}
    for d in docs:
        d["n_tokens"] = len(tok_ids[d["id"]]) + 1
        d.setdefault("difficulty", 0.5)

    root = Path(dc.root)
    tok_hash = _sha256_file(Path(dc.tokenizer_dir) / "tokenizer.json")
    for stage in D.STAGES:
        weights = OmegaConf.to_container(dc.mixture[stage])
        chosen, mix = mix_stage(docs, weights, int(dc.stage_tokens[stage]), int(dc.seed), stage)
        chosen = curriculum_order(chosen, int(dc.seed), int(dc.get("curriculum_buckets", 4)))
        shards = write_stage(root / stage, chosen, tok_ids, eos_id=eos_id,
                             vocab_size=tok.get_vocab_size(), shard_tokens=int(dc.shard_tokens))
        manifest = {
            "format": D.FORMAT, "stage": stage, "dtype": "uint16" if tok.get_vocab_size() <= 65536 else "uint32",
            "eos_id": eos_id, "vocab_size": tok.get_vocab_size(), "tokenizer_sha256": tok_hash,
            "total_tokens": sum(s["tokens"] for s in shards), "total_docs": len(chosen), "shards": shards,
            "mixture": mix, "seed": int(dc.seed),
            "config": OmegaConf.to_container(dc, resolve=True), **audit,
        }
        (root / stage / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
        print(f"[curate] {stage}: {manifest['total_tokens']} tokens, {len(chosen)} docs, "
              f"{len(shards)} shards -> {root / stage}", flush=True)
        for c, r in mix.items():
            print(f"    {c:<13} target {r['weight_pct']:6.2f}%  realised {r['realised_pct']:6.2f}%  "
                  f"upsample x{r['upsample']}", flush=True)
    print(f"[curate] done in {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
