"""Curation units: filters drop planted bad documents and keep good ones, dedup, classifiers,
mixture weights, bad records counted per reason."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
from datatrove.data import Document

from kit import curation, curation_mix
from kit import curation_steps as S
import data as D

from conftest import stage_module

curate = stage_module("curate")

GOOD_EN = ("The constitution establishes three branches of government. Each branch checks the others, "
           "so that no single office can accumulate unchecked power. Courts review laws, the legislature "
           "writes them, and the executive carries them out. Citizens elect representatives every few years, "
           "and independent judges interpret disputes between people and the state in open hearings.")
GOOD_KO = next(D.iter_source({"kind": "konlpy", "subset": "kolaw", "chunk_chars": 1500}))  # real constitution text


def doc(text, lang="en", source="s"):
    return Document(text=text, id=str(hash(text)), metadata={"lang": lang, "source": source})


def run(filters, docs):
    drops = {}
    kept = curation.apply_filters(docs, filters, drops)
    return kept, drops


def test_each_filter_drops_planted_bad_and_keeps_good():
    good = [doc(GOOD_EN), doc(GOOD_KO, "ko")]
    cases = {
        "length": (curation.LengthFilter(), doc("Too short."), "length:too_short"),
        "symbols": (curation.SymbolRatioFilter(), doc("{{#}} <<>> ## $$ %% ^^ && ** " * 40 + GOOD_EN[:80]), "symbols:"),
        "mojibake": (curation.SymbolRatioFilter(), doc(GOOD_EN.replace("e", "\ufffd")), "symbols:replacement_chars"),
        "repetition": (curation.RepetitionFilter(), doc("buy cheap pills now\n" * 60), "repetition:"),
        "language": (curation.LanguageFilter(languages=["en", "ko"]), doc("Это русский текст. " * 30, "ru"), "language:lang_other"),
    }
    for name, (f, bad, reason) in cases.items():
        kept, drops = run([f], good + [bad])
        assert [d.text for d in kept] == [d.text for d in good], name
        assert any(k.startswith(reason) for k in drops), (name, drops)


def test_code_is_exempt_from_prose_filters():
    code = doc("def f(x):\n    return {'a': [x, x]}\n" * 30, "code")
    kept, _ = run([curation.SymbolRatioFilter(skip_langs=["code"]), curation.RepetitionFilter(skip_langs=["code"])], [code])
    assert kept == [code]


def test_language_id():
    assert curation.detect_lang(GOOD_KO)[0] == "ko"
    assert curation.detect_lang(GOOD_EN)[0] == "en"
    assert curation.detect_lang("El gobierno de la ciudad publicó los datos del año en la web para los vecinos.")[0] == "es"
    assert curation.detect_lang("日本語のテキストはひらがなとカタカナと漢字を使います。")[0] == "ja"
    assert curation.detect_lang("这是一个中文句子，用来测试语言识别。")[0] == "zh"


def _jsonl_source(tmp_path, texts, name="web"):
    f = tmp_path / f"{name}.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return {name: {"kind": "jsonl", "paths": [str(f)], "lang": "en", "category": "Web"}}


def test_exact_and_minhash_dedup_remove_planted_duplicates(tmp_path):
    rng = random.Random(0)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6)) for _ in range(3000)]
    distinct = [" ".join(rng.choice(vocab) for _ in range(250)) for _ in range(12)]
    near = distinct[0].split()
    near[10] = "changed"; near[200] = "edited"  # ~1% of words differ: a near duplicate
    dc = {"sources": _jsonl_source(tmp_path, distinct + [" ".join(near), distinct[1].upper()]),  # + exact dup
          "filters": {"exact_dedup": {}},
          "minhash": {"n_grams": 5, "num_buckets": 14, "hashes_per_bucket": 8, "seed": 1, "hash_fc": "sha1"}}
    work = tmp_path / "work"
    curate.dedup_chain(dc, {"kind": "local", "workers": 1}, 1, work).run()
    kept = [json.loads(line)["id"] for f in (work / "deduped").glob("*.jsonl") for line in open(f)]
    assert sorted(kept, key=lambda i: int(i.split("/")[-1])) == [f"web/0/{i}" for i in range(12)]  # distinct survive
    audit = curation_mix.merged_audit(work)
    assert audit["drops"]["exact_dedup:exact_duplicate"] == 1
    assert audit["drops"]["minhash:near_duplicate"] == 1
    assert audit["sources"]["web"]["docs"] == 14


def test_quality_and_domain_classifiers_learn_kit_labels():
    rng = random.Random(0)
    texts = [t[:3000] for t in D.iter_source({"kind": "pydoc_topics"})] + \
        [t[:3000] for t in D.iter_source({"kind": "package_docs"})]
    rng.shuffle(texts)
    texts = texts[:150]
    neg = [curation.corrupt(t, rng) for t in texts]
    clf = curation.HashedLinear(["bad", "good"], dim=1 << 16, epochs=10).fit(texts[:120] + neg[:120], ["good"] * 120 + ["bad"] * 120)
    p = clf.predict_proba(texts[120:])[:, 1]
    assert (p > 0.5).mean() > 0.8, p
    # Boilerplate and mojibake are caught; word salad (0) and keyword spam (2) keep real words and most
    # character trigrams, which a linear bag-of-n-grams model separates poorly: a fine-tuned encoder's job.
    for kind in (1, 3):
        q = clf.predict_proba([curation.corrupt(t, rng, kind) for t in texts[120:]])[:, 1]
        assert (q < 0.5).mean() > 0.8, (kind, q)
    code = list(D.iter_source({"kind": "python_stdlib", "max_files": 40}))
    dom = curation.HashedLinear(["Code", "Encyclopedia"], dim=1 << 16, epochs=5).fit(
        code[:30] + texts[:30], ["Code"] * 30 + ["Encyclopedia"] * 30)
    pred = dom.predict_proba(code[30:40] + texts[30:40]).argmax(1)
    assert list(pred[:10]).count(0) >= 9 and list(pred[10:]).count(1) >= 9


def test_difficulty_orders_simple_below_technical():
    easy = "The cat sat on the mat. The dog ran. We like the sun. It is warm. " * 5
    hard = ("Let f(x) = (3x^2 + 2x - 7) / (x - 1); by l'Hopital's rule lim_{x->1} [(6x + 2)/1] = 8, whereas the "
            "eigendecomposition A = Q Lambda Q^{-1} requires diagonalisability of the characteristic polynomial. ") * 3
    assert curation.difficulty_score(easy) < curation.difficulty_score(hard)


def _partition(folder, rank, rows, categories, stages=("pretrain_s2",), first_id=0):
    """A tokenize task's partition files from (category, n_tokens, bucket) rows (every token of a
    document is its id: first_id + row index)."""
    folder.mkdir(parents=True, exist_ok=True)
    table, offset, stats = [], 0, {s: {} for s in stages}
    with open(folder / f"{rank:05d}.tokens", "wb") as f:
        for i, (cat, n, b) in enumerate(rows):
            f.write(np.full(n, first_id + i, dtype=np.uint32).tobytes())
            table.append((offset, n, categories.index(cat), b, 1.0, 0.5))
            offset += n
            for s in stages:
                stats[s].setdefault(cat, [0, 0])[b] += n
    np.save(folder / f"{rank:05d}.docs.npy", np.array(table, dtype=S.DOC_TABLE))
    (folder / f"{rank:05d}.stats.json").write_text(json.dumps({"docs": len(rows), "categories": categories,
                                                               "stages": stats}))


def _parts(folder):
    return [(p, json.loads(p.read_text())) for p in sorted(folder.glob("*.stats.json"))]


def test_mixture_matches_configured_weights_and_orders_easy_to_hard(tmp_path):
    rng = np.random.default_rng(0)
    cats = ["Books", "Code", "Mathematics", "STEM", "Web"]
    rows = [(cats[1:][i % 4], int(rng.integers(50, 400)), i % 2) for i in range(400)]
    for r in range(2):  # two tokenize tasks, 200 documents each
        _partition(tmp_path / "tokens", r, rows[200 * r:200 * (r + 1)], cats, first_id=200 * r)
    weights = {"Web": 50, "Code": 30, "Mathematics": 15, "STEM": 5, "Books": 0}
    w = curation_mix.ShardWriter(tmp_path / "out", np.dtype("uint32"), 10**9)
    report = curation_mix.mix_stage(_parts(tmp_path / "tokens"), "pretrain_s2", weights, {}, 200_000, 0, 2, 0.002, w)
    for c, wt in weights.items():
        if wt:
            assert abs(report[c]["realised_pct"] - wt) < 0.2, (c, report[c])
    assert report["Web"]["upsample"] > 1  # 100 Web docs (~22K tokens) had to be repeated
    [shard] = w.flush()
    assert abs(shard["tokens"] - 200_000) < 0.005 * 200_000
    # easy -> hard: every bucket-0 document comes before every bucket-1 document
    buckets = np.array([b for _, _, b in rows])[np.load(tmp_path / "out" / shard["file"])]
    assert (np.diff(buckets) >= 0).all() and buckets[0] == 0 and buckets[-1] == 1
    with pytest.raises(SystemExit, match="Reasoning"):
        curation_mix.mix_stage(_parts(tmp_path / "tokens"), "pretrain_s2", {"Web": 50, "Reasoning": 50}, {},
                               10_000, 0, 2, 0.002, w)


def test_bad_records_counted_per_reason(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_bytes(b'{"text": "good one"}\n{not json\n{"body": "no text field"}\n{"text": 5}\n'
                  b'{"text": "   "}\n{"text": "bad \xff utf8"}\n[1, 2]\n{"text": "good two"}\n')
    stats = {}
    recs = list(D.iter_records({"kind": "jsonl", "paths": [str(f)]}, stats))
    assert [r["text"] for r in recs] == ["good one", "good two"]
    assert stats["bad"] == {"malformed_json": 1, "missing_field:text": 1, "non_string_field:text": 1,
                            "empty_text": 1, "invalid_utf8": 1, "not_an_object": 1}
    assert any(e.startswith(f"{f}:2: malformed_json") for e in stats["bad_examples"])
    docs = list(S.SourceReader({"j": {"kind": "jsonl", "paths": [str(f)]}}, str(tmp_path / "audit")).run())
    audit = json.loads((tmp_path / "audit" / "00000.json").read_text())
    assert [d.text for d in docs] == ["good one", "good two"]
    assert audit["bad_records"]["malformed_json"] == 1 and audit["sources"]["j"]["docs"] == 2


def test_stage_shards_round_trip_through_loader(tmp_path):
    ids = {i: list(range(10 + i, 10 + i + 5 + i % 7)) for i in range(30)}
    w = curation_mix.ShardWriter(tmp_path / "pretrain_s1", np.dtype("uint16"), 50)
    for i in range(30):
        w.add(np.asarray(ids[i] + [1]))
    shards = w.flush()
    (tmp_path / "pretrain_s1" / "manifest.json").write_text(json.dumps({"format": D.FORMAT, "eos_id": 1, "shards": shards}))
    stream = np.concatenate([np.r_[ids[i], 1] for i in range(30)])
    ld = D.build_pretrain_loader({"root": str(tmp_path), "shuffle_window": 1}, stage="pretrain_s1",
                                 seq_len=16, dp_rank=0, dp_size=1, seed=0)
    b = ld.next_batch(3)
    assert len(shards) > 1 and np.array_equal(b["input_ids"].numpy().ravel(), stream[:48])


def test_package_docs_follow_the_lock_file(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("omegaconf==2.3.1\nhydra-core==1.3.8\n")
    docs = list(D.iter_source({"kind": "package_docs", "packages_from": str(lock), "min_chars": 1}))
    everything = list(D.iter_source({"kind": "package_docs", "min_chars": 1}))
    assert 1 <= len(docs) <= 2 < len(everything)  # a tool installed beside the kit does not join the corpus
    lock.write_text("omegaconf==2.3.1\nno-such-package-axk1==1.0\n")
    with pytest.raises(SystemExit, match=r"source package_docs: .* pins \['no-such-package-axk1'\]"):
        list(D.iter_source({"kind": "package_docs", "packages_from": str(lock)}))


def test_domain_relabel_only_where_the_classifier_is_confident(tmp_path):
    enc = [t[:3000] for t in D.iter_source({"kind": "pydoc_topics"})][:40]
    web = [t[:3000] for t in D.iter_source({"kind": "package_docs"})][:40]
    # Three package READMEs labelled Books: a small category that looks like a big one.
    labelled = [(t, "Encyclopedia") for t in enc] + [(t, "Web") for t in web[3:]] + [(t, "Books") for t in web[:3]]

    def docs():
        return [Document(text=t, id=str(i), metadata={"lang": "en", "category": c}) for i, (t, c) in enumerate(labelled)]

    list(S.BottomKSample(str(tmp_path / "sample"), "category", 1000).run(docs()))  # the sampling pass
    cfg = {"kind": "hashed_linear", "relabel": True, "train_docs_per_category": 1000}
    S.TrainClassifier("domain", cfg, str(tmp_path / "sample"), str(tmp_path / "domain.pt"), 0).train()
    assert json.loads((tmp_path / "domain.json").read_text())["heldout_docs"] > 0

    def relabelled(min_conf):
        step = S.ApplyDomain({**cfg, "relabel_min_confidence": min_conf}, str(tmp_path / "domain.pt"))
        out = list(step.run(docs()))
        return sum(d.metadata["category"] != c for d, (_, c) in zip(out, labelled)), [d.metadata["category"] for d in out]

    n_any, _ = relabelled(0.0)
    n_none, cats = relabelled(1.01)  # no prediction is that confident: every source label stays
    assert n_any > 0 and n_none == 0 and cats == [c for _, c in labelled]


def test_cluster_data_config_composes_with_the_paper_budgets(tmp_path):
    from hydra import compose, initialize_config_dir
    from datatrove.executor import SlurmPipelineExecutor

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("curate", overrides=["data=axk1", "data.data_root=/corpora", "data.executor.partition=cpu"])
    dc = cfg.data
    assert dict(dc.stage_tokens) == {"pretrain_s1": 7_000_000_000_000, "pretrain_s2": 1_660_000_000_000,
                                     "pretrain_s3": 600_000_000_000}  # paper 3.2
    assert dc.sources.books.paths == ["/corpora/books/*.jsonl"]
    for stage in D.STAGES:  # Appendix B.1 columns sum to 100
        assert abs(sum(dc.mixture[stage].values()) - 100) < 0.05
    ex = curate._executor(dict(dc.executor), [], int(dc.executor.tasks), "filter", tmp_path)
    assert isinstance(ex, SlurmPipelineExecutor) and ex.tasks == 2048


def test_quality_training_sample_gives_each_language_a_share_whatever_the_task_count(tmp_path):
    docs = [Document(text=f"en {i}", id=f"e{i}", metadata={"lang": "en"}) for i in range(500)] + \
        [Document(text=f"ko {i}", id=f"k{i}", metadata={"lang": "ko"}) for i in range(30)]
    samples = []
    for tasks in (1, 3):
        folder = tmp_path / f"t{tasks}"
        for r in range(tasks):
            list(S.BottomKSample(str(folder), "lang", 100).run(docs[r::tasks], rank=r, world_size=tasks))
        samples.append(S.stratified(S.merged_sample(str(folder), 100), 100))
    sample = samples[0]
    assert len(sample) == len(set(sample)) == 100 and samples[1] == sample  # the same sample from 1 or 3 tasks
    assert sum(t.startswith("ko") for t in sample) == 30  # all of the small language, the rest English
    assert len(S.stratified(S.merged_sample(str(tmp_path / "t1"), 10_000), 10_000)) == 130
