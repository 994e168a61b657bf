"""Tokens/s per core of each curation step on real tiny-corpus text (one process, one thread).

  OMP_NUM_THREADS=1 .venv/bin/python bench/data_throughput.py [--mb 2]

Token counts use the tiny tokenizer (artifacts/tokenizer/tiny, `make tokenizer` first), so the
figures read as "pipeline tokens per second per core"; cluster throughput is this times cores, as
every step is embarrassingly parallel across datatrove tasks (MinHash buckets included).
"""
import argparse
import random
import time

from datatrove.data import Document  # noqa: E402
from datatrove.pipeline.dedup import MinhashDedupSignature  # noqa: E402
from datatrove.pipeline.dedup.minhash import MinhashConfig  # noqa: E402
from datatrove.utils.hashing import HashConfig  # noqa: E402

import data as D  # noqa: E402
import tokenizer as tk  # noqa: E402
from kit import curation  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=2.0)
    ap.add_argument("--tokenizer", default="artifacts/tokenizer/tiny")
    a = ap.parse_args()
    docs, size = [], 0
    srcs = [{"kind": "pydoc_topics", "lang": "en"}, {"kind": "package_docs", "lang": "en"},
            {"kind": "konlpy", "lang": "ko"}, {"kind": "python_stdlib", "lang": "code", "max_files": 200}]
    for src in srcs:
        for r in D.iter_records(src, None):
            docs.append(Document(text=r["text"], id=str(len(docs)), metadata={"lang": r["lang"], "source": "b"}))
            size += len(r["text"].encode())
            if size > a.mb * 1e6 * (srcs.index(src) + 1) / len(srcs):
                break
    tok = tk.load_raw_tokenizer(a.tokenizer)
    tok.encode_special_tokens = True
    texts = [d.text for d in docs]
    t0 = time.perf_counter()
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    steps = {"tokenize (HF tokenizers, 1 thread)": time.perf_counter() - t0}

    def timed(name, fn):
        t = time.perf_counter()
        fn()
        steps[name] = time.perf_counter() - t

    for name, f in [("filter: length", curation.LengthFilter()), ("filter: symbols", curation.SymbolRatioFilter()),
                    ("filter: repetition (datatrove Gopher)", curation.RepetitionFilter()),
                    ("filter: language id", curation.LanguageFilter(skip_langs=())), ("exact dedup", curation.ExactDedupFilter())]:
        timed(name, lambda f=f: [f.filter(d) for d in docs])
    mh = MinhashDedupSignature("/tmp/_bench_sigs", MinhashConfig(hash_config=HashConfig(hash_fc="sha1", precision=64)),
                               language=curation.WORDS)
    timed("minhash signature (datatrove stage 1)", lambda: [mh.get_signature(mh.get_shingles(t)) for t in texts])
    rng = random.Random(0)
    clf = curation.HashedLinear(["bad", "good"]).fit(texts[:200] + [curation.corrupt(t, rng) for t in texts[:200]], ["good"] * 200 + ["bad"] * 200)
    timed("quality/domain model inference (hashed linear)", lambda: clf.predict_proba(texts))
    timed("difficulty score", lambda: [curation.difficulty_score(t) for t in texts])
    print(f"{len(docs)} docs, {size / 1e6:.2f} MB, {n_tokens} tokens (tiny tokenizer)\n")
    print("| step | seconds | tokens/s per core | MB/s per core |\n|---|---|---|---|")
    for name, sec in steps.items():
        print(f"| {name} | {sec:.2f} | {n_tokens / sec:,.0f} | {size / 1e6 / sec:.2f} |")


if __name__ == "__main__":
    main()
