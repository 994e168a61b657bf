"""Pre-training data: raw-text sources and the packed, sharded, deterministic loader.

On-disk format of one stage (written by stages/curate.py, `make data`), e.g.
artifacts/data/tiny/pretrain_s1/:
  manifest.json        format, dtype, eos_id, vocab_size, shards [{file, tokens, docs, sha256}],
                       plus the curation audit (sources, drops per reason, mixture, hashes)
  shard_00000.npy ...  1-D uint16 (vocab <= 65536) or uint32 token arrays. The stage's token stream
                       is the concatenation of all shards in manifest order; every document ends
                       with eos, so document boundaries are the eos positions (no side files).

The loader cuts the stream into consecutive windows of seq_len+1 tokens (overlapping by one, so
labels are the inputs shifted by one within the stream). Sample i of an epoch is window perm(i),
where perm shuffles only inside blocks of `shuffle_window` samples: the curriculum order that
curation wrote (easy -> hard, paper 3.1) survives at the coarse level, while neighbouring samples
are decorrelated. The permutation is a pure function of (seed, epoch, block), so the loader's state
is just the global sample counter: resume, 1-rank vs N-rank and batch-size ramps all see one stream.
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

STAGES = ("pretrain_s1", "pretrain_s2", "pretrain_s3")
FORMAT = "axk1-packed-v1"


# --------------------------------------------------------------------------------------------
# Raw-text sources shipped by packages (tiny configs) and user corpora (JSONL/parquet/HF).
# --------------------------------------------------------------------------------------------
def _chunk_paragraphs(text: str, target_chars: int) -> Iterator[str]:
    # Small corpora (a constitution, bills) become documents of roughly target_chars each,
    # cut at blank lines so no sentence is split.
    buf: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        if not para.strip():
            continue
        buf.append(para)
        size += len(para)
        if size >= target_chars:
            yield "\n\n".join(buf)
            buf, size = [], 0
    if buf:
        yield "\n\n".join(buf)


def _stdlib_files(cfg) -> list[str]:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = tuple(cfg.get("exclude", ["test", "site-packages", "idlelib", "lib2to3", "tkinter", "turtledemo"]))
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        if rel and rel[0] in skip:
            continue
        files.append(str(p))
    return files[: int(cfg.get("max_files", 10**9))]


def _konlpy_files() -> list[str]:
    try:
        import konlpy
    except ImportError as e:  # one clear line instead of a traceback deep inside a generator
        raise SystemExit(f"source kind=konlpy needs the konlpy package (pip install konlpy==0.6.0): {e}")
    root = Path(konlpy.__file__).parent / "data" / "corpus"
    return sorted(str(p) for p in root.rglob("*.txt"))


def _docstrings(modules: list[str], min_chars: int) -> Iterator[tuple[str, str]]:
    import importlib
    import inspect

    for mod_name in modules:
        mod = importlib.import_module(mod_name)
        for name, obj in sorted(vars(mod).items()):
            doc = inspect.getdoc(obj) if not name.startswith("_") else None
            if doc and len(doc) >= min_chars and getattr(obj, "__module__", mod_name).startswith(mod_name.split(".")[0]):
                yield f"{mod_name}.{name}", doc


def _synthetic(kind: str, n: int, seed: int, modules: list[str]) -> Iterator[str]:
    """Kit-made documents for categories no shipped text covers (the paper also synthesises
    Q&A, math and reasoning data, 3.1): deterministic in (kind, seed)."""
    import math
    import random

    rng = random.Random(f"{kind}:{seed}")
    if kind == "qa":  # question/answer pairs from standard-library docstrings
        for qual, doc in _docstrings(modules, 200):
            yield f"Question: What does `{qual}` do in Python?\n\nAnswer: {doc}"
        return
    for _ in range(n):
        if kind == "math":  # 3-6 worked problems of mixed types per document
            parts = []
            for _ in range(rng.randint(3, 6)):
                a, b, c, k, x = rng.randint(12, 999), rng.randint(3, 99), rng.randint(1, 500), rng.randint(2, 12), rng.randint(-40, 40)
                parts.append(rng.choice([
                    f"Problem: Compute {a} * {b} + {c}.\nSolution: {a} * {b} = {a * b}, and {a * b} + {c} = {a * b + c}.",
                    f"Problem: Solve {k}x + {c} = {k * x + c}.\nSolution: Subtract {c} from both sides: {k}x = {k * x}. Divide by {k}: x = {x}.",
                    f"문제: {a}와 {b}의 최대공약수를 구하시오.\n풀이: 유클리드 호제법으로 나머지를 반복해 구하면 최대공약수는 {math.gcd(a, b)}이다.",
                    f"Problem: Sum the integers from 1 to {a}.\nSolution: By Gauss's pairing, the sum is {a} * {a + 1} / 2 = {a * (a + 1) // 2}."]))
            yield "\n\n".join(parts)
        elif kind == "reasoning":  # a shuffled chain of comparisons, solved step by step
            rel = rng.choice(["taller", "older", "faster", "heavier", "richer", "stronger"])
            names = rng.sample(["Ada", "Ben", "Chloe", "Dan", "Eve", "Finn", "Gia", "Hana", "Ivan", "Jun",
                                "Kai", "Lea", "Min", "Noor", "Omar", "Pia"], rng.randint(4, 9))
            facts = [f"{names[i]} is {rel} than {names[i + 1]}." for i in range(len(names) - 1)]
            rng.shuffle(facts)
            steps = [f"Step {i + 1}: from the facts, {names[-i - 2]} beats {names[-i - 1]}, so the leader so far "
                     f"is {names[-i - 2]}." for i in range(len(names) - 1)]
            yield ("Facts: " + " ".join(facts) + f"\nQuestion: Who is the {rel}st of all {len(names)}?\n"
                   "Let us reason from the bottom of the chain upwards.\n" + "\n".join(steps)
                   + f"\nNo one is {rel} than {names[0]}. Answer: {names[0]}.")
        else:
            raise SystemExit(f"source kind=synthetic: unknown generator {kind!r} (qa, math, reasoning)")


MAX_BAD_EXAMPLES = 20  # "file:line: reason" lines kept per reader; the counts are always complete


def note_bad(stats: dict, reason: str, where: str) -> None:
    """Count one bad record under `reason` in stats["bad"] and keep the first examples as
    "file:line: reason" lines in stats["bad_examples"] (every reader reports this way)."""
    stats.setdefault("bad", {}).setdefault(reason, 0)
    stats["bad"][reason] += 1
    ex = stats.setdefault("bad_examples", [])
    if len(ex) < MAX_BAD_EXAMPLES:
        ex.append(f"{where}: {reason}")


def jsonl_objects(path: str | os.PathLike, bad) -> Iterator[tuple[str, dict]]:
    """The one JSONL line reader (pre-training sources and every post-training reader): yields
    ("file:line", object) per good line; a line that is not UTF-8, not complete JSON or not an
    object goes to bad(reason, "file:line") instead, and reading carries on. Blank lines are skipped."""
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                bad("invalid_utf8", where)
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                bad("malformed_json", where)
                continue
            if not isinstance(obj, dict):
                bad("not_an_object", where)
                continue
            yield where, obj


def iter_source(cfg) -> Iterator[str]:
    """Yields document texts of one configured source (see iter_records for the audited path)."""
    for rec in iter_records(cfg, stats=None):
        yield rec["text"]


def iter_records(cfg, stats: dict | None) -> Iterator[dict]:
    """Yields {"text", "source", "lang", "category"} records of one source.

    Bad input (malformed JSON, missing/non-string text field, invalid UTF-8, empty text) is counted
    per reason in `stats["bad"]` and the first examples are kept as "file:line: reason" lines, so
    nothing vanishes silently. With stats=None (tokenizer training) bad records are just skipped.
    """
    kind = cfg["kind"]
    name = cfg.get("name", kind)
    meta = {"source": name, "lang": cfg.get("lang", "und"), "category": cfg.get("category", "Web")}
    field = cfg.get("text_field", "text")

    def bad(reason: str, where: str):
        if stats is not None:
            note_bad(stats, reason, where)

    def ok(text, where: str):
        if not isinstance(text, str):
            bad(f"missing_field:{field}" if text is None else f"non_string_field:{field}", where)
            return None
        if not text.strip():
            bad("empty_text", where)
            return None
        return {"text": text, **meta}

    if kind == "python_stdlib":
        for f in _stdlib_files(cfg):
            raw = Path(f).read_bytes()
            try:
                r = ok(raw.decode("utf-8"), f)
            except UnicodeDecodeError:
                bad("invalid_utf8", f)
                continue
            if r:
                yield r
    elif kind == "pydoc_topics":
        import pydoc_data.topics as t

        for key in sorted(t.topics):
            r = ok(t.topics[key], f"pydoc_data.topics[{key}]")
            if r:
                yield r
    elif kind == "package_docs":
        import importlib.metadata as md

        def norm(n: str) -> str:  # PEP 503 name normalisation
            return re.sub(r"[-_.]+", "-", n).lower()

        dists = sorted(md.distributions(), key=lambda d: norm(d.metadata.get("Name") or ""))
        # packages_from: only the packages a lock file pins, so the corpus does not change when a
        # developer installs a tool into the same venv.
        pinned = None
        if cfg.get("packages_from"):
            lock = Path(__file__).resolve().parent / cfg["packages_from"]  # repo-relative unless absolute
            pinned = {norm(l.split("==")[0]) for l in lock.read_text().splitlines() if "==" in l}
            missing = pinned - {norm(d.metadata.get("Name") or "") for d in dists}
            if missing:
                raise SystemExit(f"source {name}: {lock} pins {sorted(missing)[:5]} but they are not "
                                 f"installed; run `make setup`")
        seen = set()
        for d in dists:
            pkg = norm(d.metadata.get("Name") or "")
            if pkg in seen or (pinned is not None and pkg not in pinned):
                continue
            seen.add(pkg)
            desc = d.metadata.get("Description") or d.metadata.get_payload() or ""
            if len(desc) >= int(cfg.get("min_chars", 500)):
                yield {"text": desc, **meta}
    elif kind == "docstrings":  # API reference text of installed modules, one doc per object
        for qual, doc in _docstrings(list(cfg["modules"]), int(cfg.get("min_chars", 300))):
            yield {"text": f"{qual}\n\n{doc}", **meta}
    elif kind == "synthetic":
        for text in _synthetic(cfg["generator"], int(cfg.get("n", 1000)), int(cfg.get("seed", 0)),
                               list(cfg.get("modules", []))):
            yield {"text": text, **meta}
    elif kind == "konlpy":
        for f in _konlpy_files():
            if cfg.get("subset") and Path(f).parent.name != cfg["subset"]:
                continue
            for chunk in _chunk_paragraphs(Path(f).read_text("utf-8"), int(cfg.get("chunk_chars", 1500))):
                r = ok(chunk, f)
                if r:
                    yield r
    elif kind == "text_files":  # one document per file (or per chunk), e.g. a directory of .txt/.md
        for pattern in cfg["paths"]:
            for f in sorted(glob.glob(pattern, recursive=True)):
                try:
                    text = Path(f).read_bytes().decode("utf-8")
                except UnicodeDecodeError:
                    bad("invalid_utf8", f)
                    continue
                for chunk in _chunk_paragraphs(text, int(cfg.get("chunk_chars", 10**12))):
                    r = ok(chunk, f)
                    if r:
                        yield r
    elif kind == "jsonl":
        for pattern in cfg["paths"]:
            files = sorted(glob.glob(pattern, recursive=True))
            if not files:
                raise SystemExit(f"source {name}: no file matches {pattern}")
            for f in files:
                for where, obj in jsonl_objects(f, bad):
                    r = ok(obj.get(field), where)
                    if r:
                        r["category"] = obj.get("category", r["category"])
                        r["lang"] = obj.get("lang", r["lang"])
                        yield r
    elif kind == "parquet":
        import pyarrow.parquet as pq

        for pattern in cfg["paths"]:
            for f in sorted(glob.glob(pattern, recursive=True)):
                for i, text in enumerate(pq.read_table(f, columns=[field]).column(field).to_pylist()):
                    r = ok(text, f"{f}:row{i}")
                    if r:
                        yield r
    elif kind == "hf":  # a local HF dataset (load_from_disk dir or a loader script/path); no hub
        import datasets

        path = cfg["path"]
        ds = datasets.load_from_disk(path) if os.path.isdir(path) and cfg.get("from_disk", True) \
            else datasets.load_dataset(path, split=cfg.get("split", "train"), streaming=True)
        for i, row in enumerate(ds):
            r = ok(row.get(field), f"{path}[{i}]")
            if r:
                yield r
    else:
        raise SystemExit(f"source {name}: unknown kind={kind!r} (python_stdlib, pydoc_topics, package_docs, "
                         "docstrings, synthetic, konlpy, text_files, jsonl, parquet, hf)")


# --------------------------------------------------------------------------------------------
# Packed loader.
# --------------------------------------------------------------------------------------------
class _Stream:
    """The stage's token stream as memory-mapped shards, read by global offset."""

    def __init__(self, stage_dir: Path):
        mpath = stage_dir / "manifest.json"
        if not mpath.is_file():
            raise FileNotFoundError(f"{mpath} not found: run `make data` (stages/curate.py) first")
        self.manifest = json.loads(mpath.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{mpath}: field format={self.manifest.get('format')!r}, expected {FORMAT!r}")
        self.shards = [np.load(stage_dir / s["file"], mmap_mode="r") for s in self.manifest["shards"]]
        for s, arr in zip(self.manifest["shards"], self.shards):
            if len(arr) != s["tokens"]:
                raise ValueError(f"{stage_dir / s['file']}: {len(arr)} tokens, manifest says {s['tokens']}")
        self.starts = np.concatenate([[0], np.cumsum([len(a) for a in self.shards])]).astype(np.int64)
        self.total = int(self.starts[-1])
        self.eos_id = int(self.manifest["eos_id"])

    def read(self, start: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.int64)
        pos, filled = start, 0
        while filled < length:
            k = int(np.searchsorted(self.starts, pos, side="right")) - 1
            lo = pos - int(self.starts[k])
            take = min(length - filled, len(self.shards[k]) - lo)
            out[filled:filled + take] = self.shards[k][lo:lo + take]
            filled += take
            pos += take
        return out


class PackedLoader:
    def __init__(self, stage_dir: str | os.PathLike, *, seq_len: int, dp_rank: int, dp_size: int,
                 seed: int, shuffle_window: int = 1024, stage: str = ""):
        if not (0 <= dp_rank < dp_size):
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        self.stream = _Stream(Path(stage_dir))
        self.stage, self.seq_len, self.seed = stage, int(seq_len), int(seed)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.window = max(1, int(shuffle_window))
        self.samples_per_epoch = (self.stream.total - 1) // self.seq_len
        if self.samples_per_epoch < 1:
            raise ValueError(f"{stage_dir}: {self.stream.total} tokens is less than one sample of seq_len={seq_len}")
        self.samples_consumed = 0  # global sample counter: the whole loader state
        self._perm_key, self._perm = None, None

    def _window_of(self, g: int) -> int:
        epoch, i = divmod(g, self.samples_per_epoch)
        block, j = divmod(i, self.window)
        lo = block * self.window
        n = min(self.window, self.samples_per_epoch - lo)
        if n <= 1:
            return i
        if self._perm_key != (epoch, block):  # consecutive samples share a block: keep its perm
            self._perm = np.random.default_rng([self.seed, epoch, block]).permutation(n)
            self._perm_key = (epoch, block)
        return lo + int(self._perm[j])

    def sample(self, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        w = self._window_of(g)
        toks = self.stream.read(w * self.seq_len, self.seq_len + 1)
        inp, lab = toks[:-1], toks[1:]
        # Positions restart at 0 at the window start and right after every eos (a document start).
        starts = np.zeros(self.seq_len, dtype=bool)
        starts[0] = True
        starts[1:] = inp[:-1] == self.stream.eos_id
        idx = np.arange(self.seq_len)
        last_start = np.maximum.accumulate(np.where(starts, idx, 0))
        return inp, lab, idx - last_start

    def next_batch(self, global_batch: int) -> dict[str, torch.Tensor]:
        if global_batch <= 0 or global_batch % self.dp_size != 0:
            raise ValueError(f"global_batch={global_batch} must be a positive multiple of dp_size={self.dp_size}")
        local = global_batch // self.dp_size
        first = self.samples_consumed + self.dp_rank * local
        rows = [self.sample(first + r) for r in range(local)]
        self.samples_consumed += global_batch
        return {k: torch.from_numpy(np.stack([r[i] for r in rows])) for i, k in
                enumerate(("input_ids", "labels", "positions"))}

    def state_dict(self) -> dict:
        return {"version": 1, "stage": self.stage, "seq_len": self.seq_len, "seed": self.seed,
                "samples_consumed": self.samples_consumed,
                "epoch": self.samples_consumed // self.samples_per_epoch,
                "tokens_consumed": self.samples_consumed * self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 1:
            raise ValueError(f"data loader state: field version={state.get('version')!r}, expected 1")
        if state.get("seed") != self.seed:
            raise ValueError(f"data loader state: field seed={state.get('seed')} != configured seed {self.seed}")
        if state.get("stage") == self.stage and state.get("seq_len") == self.seq_len:
            self.samples_consumed = int(state["samples_consumed"])
        elif state.get("stage") == self.stage:
            # 16K -> 32K sub-stage switch on the same pretrain_s3 data: continue at the token
            # position reached, rounded up to the next whole sample of the new length.
            self.samples_consumed = -(-int(state["tokens_consumed"]) // self.seq_len)
            print(f"[data] {self.stage}: seq_len {state.get('seq_len')} -> {self.seq_len}, resuming at "
                  f"token {state['tokens_consumed']} (sample {self.samples_consumed})", file=sys.stderr)
        else:  # a new stage starts its own stream from the beginning
            self.samples_consumed = 0


def stage_dir(data_cfg, stage: str) -> Path:
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r} must be one of {STAGES}")
    return Path(str(data_cfg["root"])) / stage


def build_pretrain_loader(data_cfg, *, stage: str, seq_len: int, dp_rank: int, dp_size: int,
                          seed: int) -> PackedLoader:
    return PackedLoader(stage_dir(data_cfg, stage), seq_len=seq_len, dp_rank=dp_rank, dp_size=dp_size,
                        seed=seed, shuffle_window=int(data_cfg.get("shuffle_window", 1024)), stage=stage)
