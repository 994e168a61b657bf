"""Mixture, curriculum and packing of the three stages from the tokenized partitions (paper 3.1,
Appendix B.1), without a global document list.

Each tokenize task left <rank>.tokens, <rank>.docs.npy (one DOC_TABLE row per document) and
<rank>.stats.json (tokens per stage, category and difficulty bucket). From the stats alone each
category's quota follows (weight x stage tokens); every partition (bucket b, task r) then owes its
token share of that quota, and draws documents from its own table: seeded passes in random order,
so a category short of text is upsampled by repetition and a large one down-sampled by a seeded
draw. What a partition over- or under-draws is carried to the category's next partition, so the
stage's shares land on target. Output order is easy to hard (bucket by bucket), the partition's
draw shuffled across categories. Memory: one partition's table and draw (tokens are memory-mapped).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from datatrove.pipeline.base import PipelineStep

import data as D
from kit.curation_steps import DOC_TABLE


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Appends documents' token arrays (eos included) and cuts a .npy shard every `shard_tokens`."""

    def __init__(self, out: Path, dtype, shard_tokens: int):
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("shard_*.npy"):
            old.unlink()
        self.out, self.dtype, self.shard_tokens = out, dtype, shard_tokens
        self.shards, self.buf, self.size, self.docs = [], [], 0, 0

    def add(self, ids: np.ndarray) -> None:
        self.buf.append(ids)
        self.size += len(ids)
        self.docs += 1
        if self.size >= self.shard_tokens:
            self.flush()

    def flush(self) -> list[dict]:
        if self.buf:
            arr = np.concatenate(self.buf).astype(self.dtype)
            f = self.out / f"shard_{len(self.shards):05d}.npy"
            np.save(f, arr)
            self.shards.append({"file": f.name, "tokens": int(len(arr)), "docs": self.docs, "sha256": sha256_file(f)})
            self.buf, self.size, self.docs = [], 0, 0
        return self.shards


def draw(n_tokens: np.ndarray, target: float, overshoot: float, rng) -> list[int]:
    """Rows summing to ~target tokens: passes in a fresh random order (repeats spread evenly); a
    document that would pass the target by more than `overshoot` tokens is skipped. When no
    document fits any more, the one that brings the sum closest to the target closes the gap if
    that is closer than stopping."""
    picked, got, took = [], 0, True
    while got < target and took:
        took = False
        for i in rng.permutation(len(n_tokens)):
            deficit = target - got
            if deficit <= 0:
                break
            if n_tokens[i] - deficit > overshoot:
                continue
            picked.append(int(i))
            got += int(n_tokens[i])
            took = True
    deficit = target - got
    if deficit > 0 and len(n_tokens):
        best = int(np.argmin(np.abs(n_tokens - deficit)))
        if abs(n_tokens[best] - deficit) < deficit:
            picked.append(best)
    return picked


def admitted(table: np.ndarray, sel: dict, web: int) -> np.ndarray:
    return (table["quality"] >= float(sel.get("min_quality", 0.0))) & \
        ((table["category"] != web) | (table["difficulty"] >= float(sel.get("web_min_difficulty", 0.0))))


def mix_stage(parts: list[tuple[Path, dict]], stage: str, weights: dict, sel: dict, target_tokens: int,
              seed: int, buckets: int, overshoot_frac: float, writer: ShardWriter) -> dict:
    """Draws one stage into `writer`; returns the per-category mixture report."""
    cats = parts[0][1]["categories"] if parts else []
    pool = {c: sum(sum(p["stages"][stage].get(c, [0])) for _, p in parts) for c in cats}
    wanted = {c: float(w) for c, w in weights.items() if float(w) > 0}
    missing = [c for c in wanted if not pool.get(c)]
    if missing:
        raise SystemExit(f"[curate] {stage}: categories {missing} have weight > 0 but no documents; "
                         f"add a source for them or set their weight to 0 in conf/data/mixture")
    wsum = sum(wanted.values())
    quota = {c: target_tokens * w / wsum for c, w in wanted.items()}
    carry = {c: 0.0 for c in wanted}  # tokens a category still owes (or over-drew) after its last partition
    report = {c: {"weight_pct": w * 100 / wsum, "target_tokens": int(quota[c]), "tokens": 0, "docs": 0,
                  "pool_docs": 0} for c, w in wanted.items()}
    web = cats.index("Web") if "Web" in cats else -1
    for b in range(buckets):
        for path, st in parts:
            table = np.load(path.with_suffix("").with_suffix(".docs.npy"))
            ok = admitted(table, sel, web) & (table["bucket"] == b)
            if not ok.any():
                continue
            rng = np.random.default_rng([seed, D.STAGES.index(stage), b, int(path.name[:5])])
            chosen = []
            for c in wanted:
                rows = np.nonzero(ok & (table["category"] == cats.index(c)))[0]
                if not len(rows):
                    continue
                n = table["n_tokens"][rows]
                target = quota[c] * int(n.sum()) / pool[c] + carry[c]
                picked = rows[draw(n, target, overshoot_frac * quota[c], rng)] if target > 0 else rows[:0]
                got = int(table["n_tokens"][picked].sum())
                carry[c] = target - got
                r = report[c]
                r["tokens"], r["docs"], r["pool_docs"] = r["tokens"] + got, r["docs"] + len(picked), r["pool_docs"] + len(rows)
                chosen += list(picked)
            if not chosen:
                continue
            tokens = np.memmap(path.with_suffix("").with_suffix(".tokens"), dtype=np.uint32, mode="r")
            for i in rng.permutation(np.array(chosen)):
                off, n = int(table["offset"][i]), int(table["n_tokens"][i])
                writer.add(np.asarray(tokens[off:off + n]))
    total = sum(r["tokens"] for r in report.values()) or 1
    for c, r in report.items():
        r["upsample"] = round(r["tokens"] / max(1, pool[c]), 3)
        r["realised_pct"] = round(100 * r["tokens"] / total, 3)
    return report


def merged_audit(work: Path) -> dict:
    """Source counts and bad records from the readers, drops per reason from datatrove's per-task
    stats, near duplicates from the MinHash step's input and output counts, the domain model's report."""
    audit = {"sources": {}, "bad_records": {}, "bad_examples": [], "drops": {}}
    for f in sorted((work / "audit" / "read").glob("*.json")):
        a = json.loads(f.read_text())
        for name, st in a["sources"].items():
            s = audit["sources"].setdefault(name, {"docs": 0, "bytes": 0})
            s["docs"], s["bytes"] = s["docs"] + st["docs"], s["bytes"] + st["bytes"]
        for reason, n in a["bad_records"].items():
            audit["bad_records"][reason] = audit["bad_records"].get(reason, 0) + n
        audit["bad_examples"] += a["bad_examples"]
    relabelled = 0
    for step in ("filter", "quality", "tokenize"):
        for f in sorted((work / "logs" / step / "stats").glob("*.json")):
            for s in json.loads(f.read_text()):
                for key, val in s.get("stats", {}).items():
                    n = int(val["total"] if isinstance(val, dict) else val)
                    if key.startswith("dropped_"):
                        k = f"{s['name'].split(': ')[-1]}:{key[8:]}"
                        audit["drops"][k] = audit["drops"].get(k, 0) + n
                    elif key == "relabelled":
                        relabelled += n

    def lines(folder: Path) -> int:
        return sum(1 for f in folder.glob("*.jsonl") for _ in open(f))

    audit["drops"]["minhash:near_duplicate"] = lines(work / "filtered" / "dedup") - lines(work / "deduped")
    audit["docs_read"] = sum(s["docs"] for s in audit["sources"].values())
    dom = work / "models" / "domain.json"
    if dom.exists():
        audit["domain_classifier"] = {**json.loads(dom.read_text()), "relabelled_docs": relabelled}
    return audit


class MixStages(PipelineStep):
    """One task: each stage's mixture, curriculum order, shards and manifest.json."""
    type, name = "📦 - PACK", "mix stages"

    def __init__(self, dc: dict):
        super().__init__()
        self.dc = dc

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        write_stages(self.dc)
        return iter(())


def write_stages(dc: dict) -> None:
    import tokenizer as tk

    tok = tk.load_raw_tokenizer(dc["tokenizer_dir"])
    vocab, eos = tok.get_vocab_size(), tok.token_to_id(tk.EOS)
    dtype = "uint16" if vocab <= 65536 else "uint32"
    work, root = Path(dc["work_dir"]), Path(dc["root"])
    parts = [(p, json.loads(p.read_text())) for p in sorted((work / "tokens").glob("*.stats.json"))]
    audit = merged_audit(work)
    audit["docs_kept"] = sum(p["docs"] for _, p in parts)
    tok_hash = sha256_file(Path(dc["tokenizer_dir"]) / "tokenizer.json")
    for stage in D.STAGES:
        writer = ShardWriter(root / stage, np.dtype(dtype), int(dc["shard_tokens"]))
        mix = mix_stage(parts, stage, dc["mixture"][stage], dc["stage_select"].get(stage, {}),
                        int(dc["stage_tokens"][stage]), int(dc["seed"]), int(dc.get("curriculum_buckets", 4)),
                        float(dc.get("mix_overshoot", 0.01)), writer)
        shards = writer.flush()
        manifest = {"format": D.FORMAT, "stage": stage, "dtype": dtype, "eos_id": eos, "vocab_size": vocab,
                    "tokenizer_sha256": tok_hash, "total_tokens": sum(s["tokens"] for s in shards),
                    "total_docs": sum(s["docs"] for s in shards), "shards": shards, "mixture": mix,
                    "seed": int(dc["seed"]), "config": dc, **audit}
        (root / stage / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
