"""Byte-level BPE tokenizer for the A.X K1 recipe (paper section 2.3, SPEC section 2).

Trained with HF `tokenizers` from a Hydra config (conf/tokenizer/*.yaml), streaming its corpus
(documents are pulled lazily from the sources in `data.iter_source`, never held whole in RAM),
and saved as tokenizer.json + tokenizer_config.json + chat_template.jinja, which
`transformers.PreTrainedTokenizerFast.from_pretrained` loads (see `load_tokenizer`).

Pre-tokenizer choice (why): one regex split, then byte-level mapping without its own regex.
- Digits are split one per token, so numbers are composed digit by digit: arithmetic and
  numbers in reasoning data tokenize uniformly (no arbitrary 3-digit chunks).
- Runs of Hangul, Han (Chinese characters), and Kana are separate pre-tokens from Latin letters and
  from each other: a merge never glues e.g. an English acronym to a Korean particle ("API를" ->
  "API" + "를"), so the particle tokens are shared across all stems, and Japanese kana endings are
  not merged into kanji stems' neighbours of another script. A leading space stays attached to a
  word (GPT-2 convention) so word starts are distinct tokens in every script.
- Punctuation runs and whitespace runs are split as in GPT-style patterns, which keeps
  code indentation as whole-space tokens (important for Python).
- No normaliser: NFC/NFKC would change bytes, and the kit promises byte-exact round trips.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from kit.progress_bar import progress

# One-token control strings. bos/eos separate documents; role tokens open chat turns.
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
THINK, END_THINK = "<think>", "</think>"
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, THINK, END_THINK]
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# Oniguruma pattern (the engine `tokenizers` uses for Split). Order matters: first match wins.
_KANA = r"\p{Hiragana}\p{Katakana}\x{30FC}"  # 30FC: the prolonged sound mark used inside kana words
PRETOKENIZE_PATTERN = "|".join([
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",                     # English contractions
    r" ?\p{Hangul}+",                                      # Korean run
    r" ?\p{Han}+",                                         # Chinese characters (kanji/hanja too)
    rf" ?[{_KANA}]+",                                      # Japanese kana run
    rf"[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}\p{{M}}&&[^\p{{Hangul}}\p{{Han}}{_KANA}]]+",  # other letters
    r"\p{N}",                                              # one digit per token
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",                          # punctuation / symbols
    r"\s*[\r\n]+",                                         # newlines (with preceding spaces)
    r"\s+(?!\S)",                                          # trailing spaces before a word
    r"\s+",
])

# Chat template (SPEC section 4). Every turn: <|role|>content<|eos|>. An assistant turn renders
# thinking mode as <think>{reasoning}</think>{response} when the message carries
# `reasoning_content` (transformers' key for reasoning traces), else non-thinking as
# </think>{response}. The generation prompt opens <|assistant|> followed by <think> (thinking,
# the default) or </think> (enable_thinking=False): the two RL samples of SPEC section 4.
# Tool use (OpenAI fields, kit/tool_calls.py): `tools` as a first system turn <tools>, one JSON
# per line, </tools>; an assistant's calls as <tool_call>{id, name, arguments}</tool_call> after
# its content; a `tool` message as a user turn <tool_response>{tool_call_id, content}</tool_response>.
CHAT_TEMPLATE = (
    "{%- if tools -%}<|system|><tools>\n"
    "{%- for t in tools -%}{{ t | tojson }}\n{%- endfor -%}</tools><|eos|>{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "<|assistant|>"
    "{%- if m.get('reasoning_content') is not none -%}<think>{{ m['reasoning_content'] }}</think>"
    "{%- else -%}</think>{%- endif -%}"
    "{{ m.get('content') or '' }}"
    "{%- for c in m.get('tool_calls') or [] -%}<tool_call>{\"id\": {{ c['id'] | tojson }}, "
    "\"name\": {{ c['function']['name'] | tojson }}, \"arguments\": "
    "{%- if c['function']['arguments'] is string -%}{{ ' ' + c['function']['arguments'] }}"
    "{%- else -%}{{ ' ' + (c['function']['arguments'] | tojson) }}{%- endif -%}}</tool_call>"
    "{%- endfor -%}<|eos|>"
    "{%- elif m['role'] == 'tool' -%}"
    "<|user|><tool_response>{{ {'tool_call_id': m['tool_call_id'], 'content': m['content']} | tojson }}"
    "</tool_response><|eos|>"
    "{%- else -%}"
    "<|{{ m['role'] }}|>{{ m['content'] }}<|eos|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>"
    "{%- if enable_thinking is defined and not enable_thinking -%}</think>{%- else -%}<think>{%- endif -%}"
    "{%- endif -%}"
)


def check_vocab_size(vocab_size: int) -> int:
    # Paper 2.3: a multiple of 128 keeps the embedding/LM-head GEMMs Tensor-Core aligned.
    if int(vocab_size) <= 0 or int(vocab_size) % 128 != 0:
        raise ValueError(f"tokenizer.vocab_size={vocab_size} must be a positive multiple of 128 (paper 2.3)")
    return int(vocab_size)


def build_untrained(cfg=None) -> Tokenizer:
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _counted(docs: Iterable[str], bar) -> Iterator[str]:
    for d in docs:
        yield d
        bar.update(len(d.encode("utf-8", "surrogatepass")))


def train_tokenizer(docs: Iterable[str], *, vocab_size: int, min_frequency: int = 2,
                    show_progress: bool = True, label: str = "tokenizer", total_bytes: int | None = None) -> Tokenizer:
    """Trains on a lazy iterable of documents; pads with reserved tokens up to vocab_size.
    `total_bytes` (the budget, when known) gives the input-streaming progress an end."""
    vocab_size = check_vocab_size(vocab_size)
    tok = build_untrained()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        # the Rust trainer's own bar only on a terminal: in a log it leaves blank lines
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress and sys.stderr.isatty())
    bar = progress(total=total_bytes, desc=f"[{label}] training input", unit="B", scale=True) if show_progress else None
    tok.train_from_iterator(_counted(docs, bar) if bar else docs, trainer=trainer)
    if bar:
        bar.close()
    # A small corpus can run out of merges before vocab_size; reserved tokens fill the table so
    # the embedding matrix always has exactly the configured (128-aligned) number of rows.
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    return tok


def to_transformers(tok: Tokenizer, model_max_length: int = 131072):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                 model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def save_tokenizer(tok: Tokenizer, out_dir: str | os.PathLike, *, model_max_length: int = 131072,
                   extra: dict | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    to_transformers(tok, model_max_length).save_pretrained(str(out))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    meta = {"vocab_size": tok.get_vocab_size(), "special_ids": ids, "bos_id": ids[BOS],
            "eos_id": ids[EOS], "pad_id": ids[PAD], **(extra or {})}
    (out / "axk1_tokenizer_meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    return out


def load_tokenizer(path: str | os.PathLike):
    """The saved tokenizer as transformers.PreTrainedTokenizerFast (chat template included)."""
    from transformers import PreTrainedTokenizerFast

    p = Path(path)
    if not (p / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{p}/tokenizer.json not found: run `make tokenizer` first")
    tok = PreTrainedTokenizerFast.from_pretrained(str(p))
    meta = p / "axk1_tokenizer_meta.json"
    if meta.is_file() and "derived_from" not in json.loads(meta.read_text()):
        # a kit tokenizer speaks the kit's current template (tool calls were added after some were
        # saved); an imported one keeps its own (kit/checkpoint_tokenizer.py marks it derived_from)
        tok.chat_template = CHAT_TEMPLATE
    return tok


def load_raw_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The bare `tokenizers.Tokenizer` (fast batch encoding in the data pipeline)."""
    p = Path(path) / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: run `make tokenizer` first")
    return Tokenizer.from_file(str(p))


def split_heldout(docs: Iterable[str], every: int, heldout: bool) -> Iterator[str]:
    """Every `every`-th document is held out of training (the report measures on it)."""
    for i, d in enumerate(docs):
        if every and (i % every == 0) == heldout:
            yield d
        elif not every and not heldout:
            yield d


def mixture_stream(sources: dict, budget_bytes: int, seed: int, balanced: bool = True,
                   heldout_every: int = 0) -> Iterator[str]:
    """Interleaves language sources up to a byte budget.

    balanced=True: each language gets `weight` of the budget, cycling (upsampling) a small source
    so that low-resource languages (Korean in the tiny corpus) reach their share.
    balanced=False: the baseline, the natural proportions: sources read in turn until the budget
    is spent, each at most once, so the big English/code sources dominate as on the raw web.
    """
    import random

    from data import iter_source as _iter

    def iter_source(src):
        return split_heldout(_iter(src), heldout_every, heldout=False)

    rng = random.Random(seed)
    names = list(sources)
    if balanced:
        wsum = sum(float(sources[n].get("weight", 1.0)) for n in names)
        quota = {n: budget_bytes * float(sources[n].get("weight", 1.0)) / wsum for n in names}
    else:
        sizes = {n: sum(len(d.encode("utf-8", "surrogatepass")) for d in iter_source(sources[n])) for n in names}
        total = sum(sizes.values()) or 1
        quota = {n: budget_bytes * sizes[n] / total for n in names}
    used = {n: 0 for n in names}
    iters = {n: iter_source(sources[n]) for n in names}
    live = [n for n in names if quota[n] > 0]
    while live:
        n = rng.choice(live)
        try:
            doc = next(iters[n])
        except StopIteration:
            if not balanced or used[n] == 0:  # baseline reads once; an empty source is dropped
                live.remove(n)
                continue
            iters[n] = iter_source(sources[n])  # upsample: start the source again
            continue
        used[n] += len(doc.encode("utf-8", "surrogatepass"))
        yield doc
        if used[n] >= quota[n]:
            live.remove(n)
