"""The curation steps of paper 3.1 as datatrove pipeline steps (composed by stages/curate.py).

Every step streams documents: a task holds one input shard's worth of state at most (its exact-dedup
hashes, its bottom-k samples, its token partition), never the corpus. The same steps run under
datatrove's LocalPipelineExecutor (tasks/workers here) or SlurmPipelineExecutor (job arrays).

- SourceReader: the kit's sources (data.iter_records), file sources split by file across tasks,
  generated ones round robin; writes each task's source counts and bad records to the work folder.
- BottomKSample: per group (language, category) the k documents with the smallest text hash. The
  union of the tasks' bottom-k holds the global bottom-k, so the training sample does not depend on
  the task count.
- TrainClassifier: one task; trains the quality or domain model on the merged sample and saves it.
- ApplyQuality / ApplyDomain: the saved model applied in batches in every task.
- TokenizePartition: difficulty score and bucket, tokens (+eos) appended to the task's partition
  file, a per-document table, and per-stage, per-category, per-bucket token stats.
"""
from __future__ import annotations

import heapq
import json
import random
import zlib
from pathlib import Path

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

import data as D
from kit import curation

FILE_KINDS = ("jsonl", "parquet", "text_files")  # sources made of files: split by file across tasks
DOC_TABLE = np.dtype([("offset", "<i8"), ("n_tokens", "<i4"), ("category", "<i2"), ("bucket", "<i2"),
                      ("quality", "<f4"), ("difficulty", "<f4")])


def text_key(text: str, salt: int = 0) -> int:
    """Deterministic 32-bit key of a text (crc32: same in every process, unlike hash())."""
    return zlib.crc32(text.encode("utf-8", "surrogatepass"), salt)


def _files(src: dict) -> list[str]:
    import glob

    out = []
    for pattern in src["paths"]:
        found = sorted(glob.glob(pattern, recursive=True))
        if not found and src["kind"] == "jsonl":
            raise SystemExit(f"source {src['name']}: no file matches {pattern}")
        out += found
    return out


class SourceReader(PipelineStep):
    type, name = "📖 - READER", "kit sources"

    def __init__(self, sources: dict, audit_dir: str):
        super().__init__()
        self.sources, self.audit_dir = sources, audit_dir

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        audit = {"sources": {}, "bad_records": {}, "bad_examples": []}
        for name, src in self.sources.items():
            src = {"name": name, **src}
            st, mine = {"docs": 0, "bytes": 0}, {}
            route = "dedup" if src.get("dedup", True) else "bypass"
            if src["kind"] in FILE_KINDS:  # file j -> task j % world_size: each task reads its files only
                recs = ((f"{name}/{j}/{k}", r) for j, f in enumerate(_files(src)) if j % world_size == rank
                        for k, r in enumerate(D.iter_records({**src, "paths": [f]}, mine)))
            else:  # generated sources: every task walks them, keeps every world_size-th document
                recs = ((f"{name}/{k}", r) for k, r in enumerate(D.iter_records(src, mine if rank == 0 else {}))
                        if k % world_size == rank)
            for doc_id, r in recs:
                st["docs"] += 1
                st["bytes"] += len(r["text"].encode("utf-8", "surrogatepass"))
                self.stat_update("documents")
                yield Document(text=r["text"], id=doc_id, metadata={"source": name, "lang": r["lang"],
                                                                    "category": r["category"], "route": route})
            st["bad"] = mine.get("bad", {})
            audit["sources"][name] = st
            for reason, n in st["bad"].items():
                audit["bad_records"][reason] = audit["bad_records"].get(reason, 0) + n
            audit["bad_examples"] += mine.get("bad_examples", [])
        Path(self.audit_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.audit_dir) / f"{rank:05d}.json").write_text(json.dumps(audit, ensure_ascii=False))


class TouchOutputs(PipelineStep):
    """Creates this task's output files even when it wrote no document: the MinHash steps pair
    signature rank r with input file r, so every rank must own one file in each folder."""
    type, name = "✍️ - WRITER", "touch outputs"

    def __init__(self, paths: list[str]):
        super().__init__()
        self.paths = paths

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        yield from data or []
        for p in self.paths:
            f = Path(p.replace("${rank}", f"{rank:05d}"))
            f.parent.mkdir(parents=True, exist_ok=True)
            f.touch()


class BottomKSample(PipelineStep):
    """Keeps, per metadata group, the k documents with the smallest text key; passes documents on."""
    type, name = "🔢 - SAMPLER", "bottom-k sample"

    def __init__(self, out_dir: str, group: str, k: int):
        super().__init__()
        self.out_dir, self.group, self.k = out_dir, group, k

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        heaps: dict[str, list] = {}
        for doc in data or []:
            h = heaps.setdefault(doc.metadata.get(self.group, "und"), [])
            item = (-text_key(doc.text), doc.id, doc.text)  # max-heap of the k smallest keys
            if len(h) < self.k:
                heapq.heappush(h, item)
            elif item > h[0]:
                heapq.heapreplace(h, item)
            yield doc
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(self.out_dir) / f"{rank:05d}.jsonl", "w") as f:
            for g, h in heaps.items():
                for negkey, doc_id, text in h:
                    f.write(json.dumps({"key": -negkey, "id": doc_id, "group": g, "text": text}, ensure_ascii=False) + "\n")


def merged_sample(sample_dir: str, k: int) -> dict[str, list[str]]:
    """The global bottom-k per group, smallest key first (ties broken by id)."""
    groups: dict[str, list] = {}
    for f in sorted(Path(sample_dir).glob("*.jsonl")):
        for line in open(f):
            r = json.loads(line)
            h = groups.setdefault(r["group"], [])
            item = (-r["key"], r["id"], r["text"])
            if len(h) < k:
                heapq.heappush(h, item)
            elif item > h[0]:
                heapq.heapreplace(h, item)
    return {g: [t for _, _, t in sorted(h, reverse=True)] for g, h in sorted(groups.items())}


def stratified(groups: dict[str, list[str]], n: int) -> list[str]:
    """n texts with every group given an equal share first (what a small group cannot fill goes to
    the others). A plain sample gives Korean a few examples out of hundreds, and the quality model
    then learns "Hangul looks unusual" and drops most Korean text."""
    pools = [list(reversed(v)) for v in groups.values()]
    out: list[str] = []
    while len(out) < n and any(pools):  # round robin over the groups that have texts left
        out += [p.pop() for p in pools if p][: n - len(out)]
    return out


class TrainClassifier(PipelineStep):
    """One task: trains the quality model (kept texts vs kit-made corruptions) or the domain model
    (category labels, a held-out fifth for the accuracy figure) and saves it in the work folder."""
    type, name = "🎓 - TRAIN", "classifier"

    def __init__(self, which: str, cfg: dict, sample_dir: str, model_file: str, seed: int):
        super().__init__()
        self.which, self.cfg, self.sample_dir, self.model_file, self.seed = which, cfg, sample_dir, model_file, seed

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        self.train()
        return iter(())

    def train(self) -> None:
        rng, out = random.Random(self.seed), Path(self.model_file)
        out.parent.mkdir(parents=True, exist_ok=True)
        if self.which == "quality":
            sample = stratified(merged_sample(self.sample_dir, int(self.cfg["train_docs"])), int(self.cfg["train_docs"]))
            if self.cfg.get("kind", "hashed_linear") == "hashed_linear":
                neg = [curation.corrupt(t, rng) for t in sample]
                curation.build_classifier(self.cfg, sample + neg, ["good"] * len(sample) + ["bad"] * len(neg),
                                          ["bad", "good"]).save(out)
            return
        groups = merged_sample(self.sample_dir, int(self.cfg["train_docs_per_category"]))
        labelled = [(t, c) for c, ts in groups.items() for t in ts]
        held = [text_key(t, 1) % 5 == 0 for t, _ in labelled]  # a fifth held out, by a second hash
        tr = [x for x, h in zip(labelled, held) if not h]
        ev = [x for x, h in zip(labelled, held) if h]
        clf = curation.build_classifier(self.cfg, [t for t, _ in tr], [c for _, c in tr], sorted(groups))
        if self.cfg.get("kind", "hashed_linear") == "hashed_linear":
            clf.save(out)
        pred = clf.predict_proba([t for t, _ in ev]).argmax(1) if ev else []
        acc = float(np.mean([clf.labels[p] == c for p, (_, c) in zip(pred, ev)])) if ev else 1.0
        out.with_suffix(".json").write_text(json.dumps({"labels": clf.labels, "heldout_accuracy": round(acc, 4),
                                                        "heldout_docs": len(ev), "train_docs": len(tr)}))


def _batched(data, size: int):
    batch = []
    for doc in data or []:
        batch.append(doc)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class ApplyQuality(PipelineStep):
    """Model-based quality filter: p(good) into metadata, documents under the threshold dropped."""
    type, name = "🔻 - FILTER", "quality_model"

    def __init__(self, cfg: dict, model_file: str):
        super().__init__()
        self.cfg, self.model_file = cfg, model_file

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        clf = curation.load_classifier(self.cfg, self.model_file)
        good, threshold = clf.labels.index("good"), float(self.cfg["threshold"])
        for batch in _batched(data, int(self.cfg.get("batch_docs", 256))):
            for doc, p in zip(batch, clf.predict_proba([d.text for d in batch])[:, good]):
                doc.metadata["quality"] = float(p)
                if p >= threshold:
                    yield doc
                else:
                    self.stat_update("dropped_low_quality")


class ApplyDomain(PipelineStep):
    """Domain classifier: replaces the source label where confident (code keeps its label)."""
    type, name = "🏷 - LABEL", "domain"

    def __init__(self, cfg: dict, model_file: str):
        super().__init__()
        self.cfg, self.model_file = cfg, model_file

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        clf = curation.load_classifier(self.cfg, self.model_file)
        min_conf, relabel = float(self.cfg.get("relabel_min_confidence", 0.0)), self.cfg.get("relabel", True)
        for batch in _batched(data, int(self.cfg.get("batch_docs", 256))):
            proba = clf.predict_proba([d.text for d in batch])
            for doc, p in zip(batch, proba):
                doc.metadata["source_category"] = doc.metadata["category"]
                if relabel and doc.metadata.get("lang") != "code" and p.max() >= min_conf:
                    if clf.labels[p.argmax()] != doc.metadata["category"]:
                        self.stat_update("relabelled")
                    doc.metadata["category"] = clf.labels[p.argmax()]
                yield doc


class TokenizePartition(PipelineStep):
    """Writes this task's partition: <rank>.tokens (uint32 ids, eos after each document),
    <rank>.docs.npy (DOC_TABLE rows) and <rank>.stats.json (tokens per stage, category, bucket of
    the documents each stage's selection admits)."""
    type, name = "🔢 - TOKENIZER", "partition"

    def __init__(self, tokenizer_dir: str, out_dir: str, categories: list[str], buckets: int,
                 stage_select: dict, batch_docs: int):
        super().__init__()
        self.tokenizer_dir, self.out_dir, self.categories = tokenizer_dir, out_dir, categories
        self.buckets, self.stage_select, self.batch_docs = buckets, stage_select, batch_docs

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        import tokenizer as tk

        tok = tk.load_raw_tokenizer(self.tokenizer_dir)
        tok.encode_special_tokens = True  # "<|eos|>" inside a document is text, never a separator
        eos = tok.token_to_id(tk.EOS)
        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        rows, offset = [], 0
        stats = {s: {} for s in self.stage_select}
        with open(out / f"{rank:05d}.tokens", "wb") as f:
            for batch in _batched(data, self.batch_docs):
                # encode_batch_fast: ids without character offsets, which cost ~100 bytes a token here
                for doc, enc in zip(batch, tok.encode_batch_fast([d.text for d in batch], add_special_tokens=False)):
                    ids = np.asarray(enc.ids + [eos], dtype=np.uint32)
                    f.write(ids.tobytes())
                    cat, q = doc.metadata["category"], float(doc.metadata.get("quality", 1.0))
                    if cat not in self.categories:
                        raise SystemExit(f"[curate] category {cat!r} of {doc.id}: not in {self.categories}")
                    diff = curation.difficulty_score(doc.text)
                    b = min(self.buckets - 1, int(diff * self.buckets))
                    rows.append((offset, len(ids), self.categories.index(cat), b, q, diff))
                    offset += len(ids)
                    self.stat_update("tokens", value=len(ids))
                    for stage, sel in self.stage_select.items():
                        if stage_admits(sel, cat, q, diff):
                            per = stats[stage].setdefault(cat, [0] * self.buckets)
                            per[b] += len(ids)
                    yield doc
        np.save(out / f"{rank:05d}.docs.npy", np.array(rows, dtype=DOC_TABLE))
        (out / f"{rank:05d}.stats.json").write_text(json.dumps({"docs": len(rows), "tokens": offset,
                                                                "categories": self.categories, "stages": stats}))


def stage_admits(sel: dict, category: str, quality: float, difficulty: float) -> bool:
    """Per-stage selection: stage 2 is "strictly filtered for high-complexity web data" (3.2)."""
    return quality >= float(sel.get("min_quality", 0.0)) and \
        (category != "Web" or difficulty >= float(sel.get("web_min_difficulty", 0.0)))
