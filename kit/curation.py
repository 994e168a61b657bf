"""Curation units of paper 3.1, each configurable and testable on its own (used by stages/curate.py).

Filters are datatrove `BaseFilter`s, so the same objects run in-process here, under datatrove's
LocalPipelineExecutor, or under its SlurmPipelineExecutor on a cluster, and datatrove counts their
drops per reason ("dropped_<reason>" in its stats). Near-dedup is datatrove's MinHash (4 stages).
datatrove's own word tokenizers need spaCy/Kiwi models; `ScriptWordTokenizer` below is a
dependency-free multilingual stand-in (letters runs for alphabetic scripts, Hangul/kana runs,
one Han character per word), passed to datatrove wherever it wants a language.

Classifiers are pluggable (`build_classifier`): the default `HashedLinear` is a fastText-style
linear model over hashed word and character n-grams, trained here in seconds on labelled data the
kit makes; `kind: hf_encoder` loads a fine-tuned sequence-classification encoder (the paper
fine-tunes its Korean long-context encoder, 3.1) from a local path.
"""
from __future__ import annotations

import hashlib
import random
import re
import unicodedata
import zlib

import numpy as np
import torch
from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.filters.gopher_repetition_filter import GopherRepetitionFilter
from datatrove.utils.word_tokenizers import WordTokenizer


_WORD = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]+|[\u4e00-\u9fff\u3400-\u4dbf]|"
                   r"[\u3040-\u30ff\u30fc]+|[^\W\d_]+|\d+", re.UNICODE)
_MATHY = re.compile(r"[0-9=+\-*/^<>∑∫√]")
_SENT = re.compile(r"[^.!?。！？\n]+[.!?。！？]*")


class ScriptWordTokenizer(WordTokenizer):
    def word_tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [s.strip() for s in _SENT.findall(text) if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in _SENT.finditer(text) if m.group().strip()]


WORDS = ScriptWordTokenizer()

# --------------------------------------------------------------------------------------------
# Script-based language id (offline, no model): shares of Hangul / kana / Han / Latin letters,
# and Spanish vs English by function words and Spanish-only characters.
# --------------------------------------------------------------------------------------------
_ES = {"el", "la", "de", "que", "y", "los", "las", "en", "por", "una", "es", "con", "para", "del"}
_EN = {"the", "of", "and", "to", "is", "in", "that", "for", "it", "with", "as", "on", "this", "are"}


def detect_lang(text: str) -> tuple[str, float]:
    counts = {"ko": 0, "ja": 0, "zh": 0, "latin": 0, "other": 0}
    for ch in text[:20000]:
        o = ord(ch)
        if 0xAC00 <= o <= 0xD7A3 or 0x1100 <= o <= 0x11FF or 0x3130 <= o <= 0x318F:
            counts["ko"] += 1
        elif 0x3040 <= o <= 0x30FF:
            counts["ja"] += 1
        elif 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF:
            counts["zh"] += 1
        elif ch.isalpha():
            counts["latin" if o < 0x250 else "other"] += 1
    letters = sum(counts.values())
    if letters == 0:
        return "und", 0.0
    # Japanese mixes kanji and kana: any real kana share makes Han characters Japanese.
    if counts["ja"] > 0.1 * (counts["ja"] + counts["zh"]):
        counts["ja"] += counts.pop("zh")
    best = max(counts, key=counts.get)
    conf = counts[best] / letters
    if best == "latin":
        words = [w.lower() for w in _WORD.findall(text[:20000])]
        es = sum(w in _ES for w in words) + 3 * len(re.findall("[ñ¿¡]", text[:20000]))
        en = sum(w in _EN for w in words)
        best = "es" if es > en else "en"
    return best, conf


# --------------------------------------------------------------------------------------------
# Heuristic filters. `skip_langs` exempts documents whose source language is listed (code has
# its own repetition and symbol statistics, so prose thresholds would drop good code).
# --------------------------------------------------------------------------------------------
def _exempt(doc: Document, skip_langs: set, skip_sources: set) -> bool:
    return doc.metadata.get("lang") in skip_langs or doc.metadata.get("source") in skip_sources


class _LangAware(BaseFilter):
    def __init__(self, skip_langs=(), skip_sources=()):
        super().__init__()
        self.skip_langs, self.skip_sources = set(skip_langs), set(skip_sources)

    def filter(self, doc: Document):
        if _exempt(doc, self.skip_langs, self.skip_sources):
            return True
        return self.check(doc.text)


class LengthFilter(_LangAware):
    name = "length"

    def __init__(self, min_chars=200, max_chars=2_000_000, min_words=30, skip_langs=(), skip_sources=()):
        super().__init__(skip_langs, skip_sources)
        self.min_chars, self.max_chars, self.min_words = min_chars, max_chars, min_words

    def check(self, text):
        if len(text) < self.min_chars:
            return False, "too_short"
        if len(text) > self.max_chars:
            return False, "too_long"
        if len(WORDS.word_tokenize(text)) < self.min_words:
            return False, "too_few_words"
        return True


class SymbolRatioFilter(_LangAware):
    """Drops markup/garbage: too few letters, too many symbols, or mojibake (replacement chars)."""
    name = "symbols"

    def __init__(self, min_alpha_frac=0.5, max_symbol_frac=0.25, max_replacement_frac=0.001, skip_langs=(), skip_sources=()):
        super().__init__(skip_langs, skip_sources)
        self.min_alpha, self.max_symbol, self.max_repl = min_alpha_frac, max_symbol_frac, max_replacement_frac

    def check(self, text):
        nonspace = [c for c in text if not c.isspace()] or [" "]
        alpha = sum(c.isalpha() for c in nonspace) / len(nonspace)
        symbol = sum(unicodedata.category(c)[0] in "PS" for c in nonspace) / len(nonspace)
        if text.count("\ufffd") / len(nonspace) > self.max_repl:
            return False, "replacement_chars"
        if alpha < self.min_alpha:
            return False, "low_alpha_ratio"
        if symbol > self.max_symbol:
            return False, "high_symbol_ratio"
        return True


class RepetitionFilter(GopherRepetitionFilter):
    """datatrove's Gopher repetition rules (duplicate lines/paragraphs, top and duplicated n-grams)
    with our multilingual word tokenizer."""
    name = "repetition"

    def __init__(self, skip_langs=(), skip_sources=(), **kw):
        super().__init__(language=WORDS, **kw)
        self.skip_langs, self.skip_sources = set(skip_langs), set(skip_sources)

    def filter(self, doc: Document):
        if _exempt(doc, self.skip_langs, self.skip_sources):
            return True
        return super().filter(doc)


class LanguageFilter(_LangAware):
    """Keeps documents whose detected language is allowed with enough script confidence; records
    the detected language in metadata."""
    name = "language"

    def __init__(self, languages=("en", "ko", "zh", "ja", "es"), min_confidence=0.6, skip_langs=("code",), skip_sources=()):
        super().__init__(skip_langs, skip_sources)
        self.languages, self.min_conf = set(languages), min_confidence

    def filter(self, doc: Document):
        if _exempt(doc, self.skip_langs, self.skip_sources):
            return True
        lang, conf = detect_lang(doc.text)
        doc.metadata["lang_detected"] = lang
        if lang not in self.languages:
            return False, f"lang_{lang}"
        return (True if conf >= self.min_conf else (False, "low_lang_confidence"))


class ExactDedupFilter(BaseFilter):
    """First, cheap pass: drops documents identical after case/whitespace normalisation (within one
    task; across tasks identical documents also share MinHash signatures and meet in stage 2)."""
    name = "exact_dedup"

    def __init__(self):
        super().__init__()
        self.seen: set[bytes] = set()

    def run(self, data, rank: int = 0, world_size: int = 1):
        self.seen = set()  # per task, also when one process runs several tasks in turn
        yield from super().run(data, rank, world_size)

    def filter(self, doc: Document):
        h = hashlib.blake2b(" ".join(doc.text.lower().split()).encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if h in self.seen:
            return False, "exact_duplicate"
        self.seen.add(h)
        return True


FILTERS = {"length": LengthFilter, "symbols": SymbolRatioFilter, "repetition": RepetitionFilter,
           "language": LanguageFilter, "exact_dedup": ExactDedupFilter}


def build_filters(cfg: dict) -> list[BaseFilter]:
    """cfg: {name: {kwargs}} in pipeline order; an entry set to null is disabled."""
    out = []
    for name, kw in cfg.items():
        if kw is None or kw is False:
            continue
        if name not in FILTERS:
            raise SystemExit(f"data.filters.{name}: unknown filter (one of {sorted(FILTERS)})")
        kw = dict(kw or {})
        if "top_n_grams" in kw:
            kw["top_n_grams"] = tuple(tuple(x) for x in kw["top_n_grams"])
        if "dup_n_grams" in kw:
            kw["dup_n_grams"] = tuple(tuple(x) for x in kw["dup_n_grams"])
        out.append(FILTERS[name](**kw))
    return out


def apply_filters(docs: list[Document], filters: list[BaseFilter], drops: dict) -> list[Document]:
    """In-process run of the filter chain with per-filter, per-reason drop counts."""
    for f in filters:
        kept = []
        for d in docs:
            res = f.filter(d)
            ok, reason = (res, None) if isinstance(res, bool) else (res[0], res[1] if len(res) > 1 else None)
            if ok:
                kept.append(d)
            else:
                key = f"{f.name}:{reason or 'dropped'}"
                drops[key] = drops.get(key, 0) + 1
        docs = kept
    return docs


# --------------------------------------------------------------------------------------------
# Classifiers.
# --------------------------------------------------------------------------------------------
def _features(text: str, dim: int) -> np.ndarray:
    # The first 2,000 characters decide: classifiers judge a document by its opening (as an
    # encoder with a context limit would). crc32 is deterministic across processes, unlike hash().
    # An int32 array (4 bytes a feature, not a Python int's 36): training holds one per sample text.
    s = text[:2000]
    words = [w.lower() for w in WORDS.word_tokenize(s)]
    # word bigrams carry word order (word salad has none of the common ones); unigrams add topic
    grams = [a + " " + b for a, b in zip(words, words[1:])] + words[::4]
    grams += [s[i:i + 3] for i in range(0, max(0, len(s) - 2), 2)]  # char trigrams: scripts, symbols, code
    return np.array([zlib.crc32(g.encode("utf-8", "surrogatepass")) % dim for g in grams] or [0], dtype=np.int32)


class HashedLinear:
    """Multinomial logistic regression over hashed n-grams (a fastText-style linear classifier)."""

    def __init__(self, labels: list[str], dim: int = 1 << 18, epochs: int = 5, lr: float = 0.5, seed: int = 0):
        self.labels, self.dim, self.epochs, self.lr, self.seed = list(labels), dim, epochs, lr, seed
        torch.manual_seed(seed)
        self.emb = torch.nn.EmbeddingBag(dim, len(self.labels), mode="mean", sparse=True)
        torch.nn.init.zeros_(self.emb.weight)
        self.bias = torch.nn.Parameter(torch.zeros(len(self.labels)))

    def _bags(self, texts=None, feats=None):
        feats = feats if feats is not None else [_features(t[:2000], self.dim) for t in texts]
        offsets = torch.tensor([0] + [len(f) for f in feats[:-1]]).cumsum(0)
        return torch.from_numpy(np.concatenate(feats).astype(np.int64)), offsets

    def fit(self, texts: list[str], labels: list[str]) -> "HashedLinear":
        y = torch.tensor([self.labels.index(l) for l in labels])
        opt = torch.optim.Adagrad(list(self.emb.parameters()) + [self.bias], lr=self.lr)
        order = list(range(len(texts)))
        feats = [_features(t[:2000], self.dim) for t in texts]  # hashed once, reused every epoch
        rng = random.Random(self.seed)
        for _ in range(self.epochs):
            rng.shuffle(order)
            for i in range(0, len(order), 64):
                idx = order[i:i + 64]
                flat, off = self._bags(feats=[feats[j] for j in idx])
                loss = torch.nn.functional.cross_entropy(self.emb(flat, off) + self.bias, y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return self

    def save(self, path) -> None:
        torch.save({"labels": self.labels, "dim": self.dim, "weight": self.emb.weight.data, "bias": self.bias.data}, path)

    @classmethod
    def load(cls, path) -> "HashedLinear":
        st = torch.load(path, weights_only=True)
        clf = cls(st["labels"], dim=st["dim"])
        clf.emb.weight.data.copy_(st["weight"])
        clf.bias.data.copy_(st["bias"])
        return clf

    @torch.no_grad()
    def predict_proba(self, texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), 256):
            flat, off = self._bags(texts[i:i + 256])
            out.append(torch.softmax(self.emb(flat, off) + self.bias, -1).numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)))


class HFEncoder:
    """A fine-tuned sequence-classification encoder from a local directory (no hub access)."""

    def __init__(self, path: str, max_length: int = 512, batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.max_length, self.batch_size = max_length, batch_size

    @torch.no_grad()
    def predict_proba(self, texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tok(texts[i:i + self.batch_size], truncation=True, max_length=self.max_length,
                           padding=True, return_tensors="pt")
            out.append(torch.softmax(self.model(**enc).logits.float(), -1).numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)))


def corrupt(text: str, rng: random.Random, kind: int | None = None) -> str:
    """Kit-made negatives for the quality classifier: the low-information web noise that the
    paper's model-based filter targets (shuffled word salad, boilerplate, keyword spam, mojibake)."""
    words = text.split()
    kind = rng.randrange(4) if kind is None else kind
    if kind == 0:
        rng.shuffle(words)
        return " ".join(words)
    if kind == 1:
        return "\n".join(rng.choice(["Home | About | Contact", "Click here to subscribe!", "Cookie policy",
                                     "Share on Facebook", "로그인 | 회원가입", "All rights reserved."])
                         for _ in range(max(5, len(words) // 8)))
    if kind == 2:
        kw = rng.sample(words, min(5, len(words))) or ["buy"]
        return " ".join(rng.choice(kw) for _ in range(max(20, len(words))))
    # mis-decoded bytes: UTF-8 read as Latin-1 leaves "Ã©", "â€™" and replacement characters
    return "".join(c if rng.random() > 0.25 else rng.choice(["Ã©", "â€™", "Â", "\ufffd", "Ã¼"]) for c in text)


def build_classifier(cfg: dict, train_texts: list[str], train_labels: list[str], labels: list[str]):
    kind = cfg.get("kind", "hashed_linear")
    if kind == "hashed_linear":
        return HashedLinear(labels, dim=int(cfg.get("dim", 1 << 18)), epochs=int(cfg.get("epochs", 5)),
                            lr=float(cfg.get("lr", 0.5)), seed=int(cfg.get("seed", 0))).fit(train_texts, train_labels)
    if kind == "hf_encoder":
        clf = HFEncoder(cfg["path"], int(cfg.get("max_length", 512)))
        if set(clf.labels) != set(labels):
            raise SystemExit(f"{cfg['path']}: encoder labels {clf.labels} != expected {labels}")
        return clf
    raise SystemExit(f"classifier kind={kind!r}: use hashed_linear or hf_encoder")


def load_classifier(cfg: dict, model_file):
    """The applying side of build_classifier: the trained model saved in the work folder, or the encoder."""
    if cfg.get("kind", "hashed_linear") == "hf_encoder":
        return HFEncoder(cfg["path"], int(cfg.get("max_length", 512)))
    return HashedLinear.load(model_file)


def difficulty_score(text: str) -> float:
    """Heuristic difficulty in [0, 1] from the paper's three cues (3.1): lexical complexity (word
    length, vocabulary richness), syntactic structure (sentence length, bracket nesting) and
    semantic depth (density of digits, math symbols and technical tokens)."""
    s = text[:20000]
    words = WORDS.word_tokenize(s) or [""]
    sents = WORDS.sent_tokenize(s) or [s]
    lexical = min(1.0, np.mean([len(w) for w in words]) / 8) * 0.5 + min(1.0, len(set(words)) / len(words)) * 0.5
    syntactic = min(1.0, len(words) / len(sents) / 40)
    opens = np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32)
    steps = np.isin(opens, [40, 91, 123]).astype(np.int32) - np.isin(opens, [41, 93, 125]).astype(np.int32)
    max_depth = int(np.cumsum(steps).max(initial=0))
    semantic = min(1.0, len(_MATHY.findall(s)) / max(1, len(s)) * 8)
    return float(np.clip(0.35 * lexical + 0.3 * syntactic + 0.1 * min(1.0, max_depth / 4) + 0.25 * semantic, 0, 1))
