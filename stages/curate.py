"""Hydra stage: curate, mix, tokenize and pack the pre-training data of the three stages (paper 3.1).

  python stages/curate.py                 # tiny: artifacts/data/tiny/pretrain_s{1,2,3}/
  python stages/curate.py data=axk1       # cluster config (see conf/data/axk1.yaml)
  python stages/curate.py data=tiny --cfg job --resolve   # prints the fully composed config, runs nothing

Steps: read sources (bad records counted per reason) -> heuristic filters -> exact + near dedup
-> model quality filter -> domain classifier -> difficulty scorer -> per-stage domain-aware mixture
(Appendix B.1 weights, upsampling) -> curriculum order (easy to hard) -> tokenize -> packed shards
+ manifest.json (the audit trail: source counts, drops per reason, tokens per category, hashes).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

import data as D
import tokenizer as tk
from kit import curation
from kit.progress_bar import progress

TOKENIZE_BATCH = 4096  # documents per encode_batch call (tokenizers parallelises inside one), a progress tick each


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
        for rec in progress(D.iter_records({"name": name, **src}, st), desc=f"[curate] read {name}", unit="doc"):
            st["docs"] += 1
            st["bytes"] += len(rec["text"].encode("utf-8", "surrogatepass"))
            docs.append(rec)
        audit["sources"][name] = st
        for reason, n in st.get("bad", {}).items():
            audit["bad_records"][reason] = audit["bad_records"].get(reason, 0) + n
        audit["bad_examples"] += st.get("bad_examples", [])
        print(f"[curate] source {name}: {st['docs']} docs, {st['bytes'] / 1e6:.2f} MB, bad {st.get('bad', {})}", flush=True)
    return docs


def _executor(ex_cfg: dict, pipeline: list, tasks: int, name: str, work: Path, depends=None):
    """datatrove executor: LocalPipelineExecutor here, SlurmPipelineExecutor on a cluster (same steps)."""
    from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor

    logs = str(work / "logs" / name)
    if ex_cfg.get("kind", "local") == "local":
        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=int(ex_cfg.get("workers", 1)),
                                     logging_dir=logs, depends=depends, start_method="fork")
    return SlurmPipelineExecutor(pipeline, tasks=tasks, job_name=f"axk1-{name}", logging_dir=logs, depends=depends,
                                 time=ex_cfg["time"], partition=ex_cfg["partition"],
                                 cpus_per_task=int(ex_cfg.get("cpus_per_task", 1)),
                                 mem_per_cpu_gb=int(ex_cfg.get("mem_per_cpu_gb", 2)),
                                 venv_path=ex_cfg.get("venv_path"), sbatch_args=ex_cfg.get("sbatch_args"))


def filter_and_dedup(docs: list[dict], dc: DictConfig, work: Path, audit: dict) -> list[dict]:
    """Heuristic filters + exact dedup, then MinHash near-dedup, as datatrove pipelines over JSONL."""
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    ex = OmegaConf.to_container(dc.executor, resolve=True)
    tasks = int(ex.get("tasks", 1))
    raw = work / "raw"
    raw.mkdir(parents=True)
    # Input split into `tasks` files so each datatrove task reads one.
    outs = [open(raw / f"{i:05d}.jsonl", "w") for i in range(tasks)]
    for d in docs:
        outs[d["id"] % tasks].write(json.dumps({"id": str(d["id"]), "text": d["text"], "source": d["source"],
                                                "lang": d["lang"], "category": d["category"]}, ensure_ascii=False) + "\n")
    for f in outs:
        f.close()
    filters = curation.build_filters(OmegaConf.to_container(dc.filters, resolve=True))
    mh = OmegaConf.to_container(dc.minhash, resolve=True)
    mcfg = MinhashConfig(n_grams=int(mh["n_grams"]), num_buckets=int(mh["num_buckets"]),
                         hashes_per_bucket=int(mh["hashes_per_bucket"]), seed=int(mh.get("seed", 1)),
                         hash_config=HashConfig(hash_fc=mh.get("hash_fc", "sha1"), precision=64))
    filt = _executor(ex, [JsonlReader(str(raw)), *filters, JsonlWriter(str(work / "filtered"), compression=None)],
                     tasks, "filter", work)
    filt.run()
    if filt.get_incomplete_ranks():
        raise SystemExit(f"[curate] datatrove filter jobs submitted (logs in {work / 'logs'}); re-run with "
                         "data.resume=true once they finish")
    # Kit-made sources (dedup: false) are templated on purpose: MinHash would fold them together,
    # so they bypass near-dedup (they still went through the filters above).
    no_dedup = {n for n, src in dc.sources.items() if not src.get("dedup", True)}
    (work / "to_dedup").mkdir()
    bypass = []
    with open(work / "to_dedup" / "00000.jsonl", "w") as out:
        for f in sorted((work / "filtered").glob("*.jsonl")):
            for line in open(f):
                rec = json.loads(line)
                if rec.get("metadata", {}).get("source") in no_dedup:
                    bypass.append(rec["id"])
                else:
                    out.write(line)
    sig = _executor(ex, [JsonlReader(str(work / "to_dedup")), MinhashDedupSignature(str(work / "sigs"), mcfg, language=curation.WORDS)],
                    1, "minhash1", work)
    buck = _executor(ex, [MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=mcfg)],
                     mcfg.num_buckets, "minhash2", work, depends=sig)
    clus = _executor(ex, [MinhashDedupCluster(str(work / "buckets"), str(work / "remove_ids"), config=mcfg)],
                     1, "minhash3", work, depends=buck)
    last = _executor(ex, [JsonlReader(str(work / "to_dedup")),
                          MinhashDedupFilter(str(work / "remove_ids"),
                                             exclusion_writer=JsonlWriter(str(work / "near_dups"), compression=None)),
                          JsonlWriter(str(work / "deduped"), compression=None)], 1, "minhash4", work, depends=clus)
    last.run()
    if last.get_incomplete_ranks():  # Slurm: jobs were submitted; the tail runs on the next call
        raise SystemExit(f"[curate] datatrove jobs submitted (logs in {work / 'logs'}); re-run this command "
                         "with data.resume=true once they finish")
    # Drop counts per reason from datatrove's own stats of the filter run.
    for step in json.loads((work / "logs" / "filter" / "stats.json").read_text()):
        for key, val in step.get("stats", {}).items():
            if key.startswith("dropped_"):
                audit["drops"][f"{step['name'].split(': ')[-1]}:{key[8:]}"] = int(val["total"] if isinstance(val, dict) else val)
    by_id = {str(d["id"]): d for d in docs}
    kept = [by_id[i] for i in bypass]
    for f in sorted((work / "deduped").glob("*.jsonl")):
        for line in open(f):
            kept.append(by_id[json.loads(line)["id"]])
    n_filtered = sum(1 for f in (work / "filtered").glob("*.jsonl") for _ in open(f))
    audit["drops"]["minhash:near_duplicate"] = n_filtered - len(kept)
    kept.sort(key=lambda d: d["id"])
    return kept


def stratified_sample(docs: list[dict], n: int, rng) -> list[str]:
    """n texts with every language given an equal share first (what a small language cannot fill
    goes to the others). A plain random sample gives Korean a few examples out of hundreds, and the
    quality model then learns "Hangul looks unusual" and drops most Korean text."""
    by_lang: dict[str, list[str]] = {}
    for d in docs:
        by_lang.setdefault(d.get("lang", "und"), []).append(d["text"])
    pools = [rng.sample(v, len(v)) for _, v in sorted(by_lang.items())]
    out: list[str] = []
    while len(out) < n and any(pools):  # round robin over the languages that have texts left
        out += [p.pop() for p in pools if p][: n - len(out)]
    return out


def classify(docs: list[dict], dc: DictConfig, audit: dict) -> list[dict]:
    """Model quality filter, domain classifier and difficulty scorer (paper 3.1)."""
    rng = __import__("random").Random(int(dc.seed))
    q = OmegaConf.to_container(dc.quality, resolve=True)
    texts = [d["text"] for d in docs]
    if q.get("enabled", True):
        # Labelled data the kit makes: surviving documents are "good", corrupted copies are "bad".
        sample = stratified_sample(docs, int(q.get("train_docs", 600)), rng)
        neg = [curation.corrupt(t, rng) for t in sample]
        clf = curation.build_classifier(q, sample + neg, ["good"] * len(sample) + ["bad"] * len(neg), ["bad", "good"])
        p_good = clf.predict_proba(texts)[:, clf.labels.index("good")]
        keep = p_good >= float(q["threshold"])
        audit["drops"]["quality_model:low_quality"] = int((~keep).sum())
        docs = [dict(d, quality=float(p)) for d, p, k in zip(docs, p_good, keep) if k]
    dm = OmegaConf.to_container(dc.domain, resolve=True)
    if dm.get("enabled", True):
        labels = sorted({d["category"] for d in docs})
        idx = list(range(len(docs)))
        rng.shuffle(idx)
        n_eval = len(idx) // 5  # held-out accuracy goes into the manifest
        tr, ev = idx[n_eval:], idx[:n_eval]
        clf = curation.build_classifier(dm, [docs[i]["text"] for i in tr], [docs[i]["category"] for i in tr], labels)
        proba = clf.predict_proba([d["text"] for d in docs])
        pred, conf = proba.argmax(1), proba.max(1)
        acc = float(np.mean([clf.labels[pred[i]] == docs[i]["category"] for i in ev])) if ev else 1.0
        audit["domain_classifier"] = {"labels": clf.labels, "heldout_accuracy": round(acc, 4), "heldout_docs": len(ev)}
        relabelled, min_conf = 0, float(dm.get("relabel_min_confidence", 0.0))
        for d, p, c in zip(docs, pred, conf):
            d["source_category"] = d["category"]
            if dm.get("relabel", True) and d.get("lang") != "code" and c >= min_conf:
                relabelled += clf.labels[p] != d["category"]
                d["category"] = clf.labels[p]
        audit["domain_classifier"]["relabelled_docs"] = int(relabelled)
    for d in docs:
        d["difficulty"] = curation.difficulty_score(d["text"])
    return docs


def select_stage(docs: list[dict], sel: dict) -> list[dict]:
    q, wd = float(sel.get("min_quality", 0.0)), float(sel.get("web_min_difficulty", 0.0))
    return [d for d in docs if d.get("quality", 1.0) >= q and (d["category"] != "Web" or d["difficulty"] >= wd)]


def mix_stage(docs: list[dict], weights: dict, target_tokens: int, seed: int, stage: str) -> tuple[list[dict], dict]:
    """Samples documents per category to hit weight * target tokens, upsampling small pools.

    Whole documents are drawn (without replacement first, then repeated passes in a fresh random
    order); a document that would overshoot the category's quota by more than 1% is skipped (a later
    pass may still fill the gap with shorter ones), so realised shares stay within ~1% of target.
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
                if pool[i]["n_tokens"] - deficit > 0.01 * quota:  # would overshoot the share by > 1%
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
    audit["docs_read"] = len(docs)
    work = Path(dc.work_dir)
    if not dc.get("resume", False) and work.exists():
        shutil.rmtree(work)  # datatrove skips tasks it finds completed: a fresh run starts clean
    t1 = time.time()
    docs = filter_and_dedup(docs, dc, work, audit)
    print(f"[curate] filters + dedup: {len(docs)} docs kept in {time.time() - t1:.1f}s; drops {audit['drops']}", flush=True)
    t1 = time.time()
    docs = classify(docs, dc, audit)
    print(f"[curate] quality/domain/difficulty: {len(docs)} docs in {time.time() - t1:.1f}s; "
          f"domain classifier {audit.get('domain_classifier')}", flush=True)
    audit["docs_kept"] = len(docs)

    # Tokenize every surviving document once; stages reuse the ids (upsampled docs included).
    tok_ids = {}
    with progress(total=len(docs), desc="[curate] tokenize", unit="doc") as bar:
        for i in range(0, len(docs), TOKENIZE_BATCH):
            chunk = docs[i:i + TOKENIZE_BATCH]
            tok_ids.update((d["id"], e.ids) for d, e in zip(chunk, tok.encode_batch([d["text"] for d in chunk],
                                                                                  add_special_tokens=False)))
            bar.update(len(chunk))
    for d in docs:
        d["n_tokens"] = len(tok_ids[d["id"]]) + 1

    root = Path(dc.root)
    tok_hash = _sha256_file(Path(dc.tokenizer_dir) / "tokenizer.json")
    for stage in D.STAGES:
        weights = OmegaConf.to_container(dc.mixture[stage])
        pool = select_stage(docs, OmegaConf.to_container(dc.stage_select.get(stage, {})))
        chosen, mix = mix_stage(pool, weights, int(dc.stage_tokens[stage]), int(dc.seed), stage)
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
