"""Tokenizer: byte-exact round trips, single-id specials, chat template, vocab alignment check."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenizer as tk


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    # A small multilingual corpus (English docs, Korean law text, stdlib code) trained in ~1 s.
    sources = {
        "en": {"kind": "pydoc_topics", "weight": 0.3},
        "ko": {"kind": "konlpy", "weight": 0.4, "chunk_chars": 800},
        "code": {"kind": "python_stdlib", "weight": 0.3, "max_files": 40},
    }
    docs = tk.mixture_stream(sources, 400_000, seed=0, balanced=True)
    tok = tk.train_tokenizer(docs, vocab_size=1024, show_progress=False)
    out = tmp_path_factory.mktemp("tok")
    tk.save_tokenizer(tok, out, model_max_length=4096)
    return tk.load_tokenizer(out), out


def test_vocab_must_be_multiple_of_128():
    with pytest.raises(ValueError, match="multiple of 128"):
        tk.check_vocab_size(4000)
    with pytest.raises(ValueError, match="multiple of 128"):
        tk.train_tokenizer(iter(["x"]), vocab_size=1000, show_progress=False)
    assert tk.check_vocab_size(163840) == 163840  # the 519B config (paper 2.3)


def test_saved_vocab_size_and_meta(trained):
    hf, out = trained
    assert len(hf) == 1024
    meta = json.loads((out / "axk1_tokenizer_meta.json").read_text())
    assert meta["vocab_size"] == 1024 and meta["eos_id"] == hf.eos_token_id


def test_special_tokens_are_single_ids(trained):
    hf, _ = trained
    ids = set()
    for s in tk.SPECIAL_TOKENS:
        enc = hf.encode(s, add_special_tokens=False)
        assert len(enc) == 1, (s, enc)
        assert hf.decode(enc) == s
        ids.add(enc[0])
    assert len(ids) == len(tk.SPECIAL_TOKENS)
    # Inside text too: "<think>" keeps its id next to other characters.
    enc = hf.encode("abc<think>x</think>y", add_special_tokens=False)
    assert hf.convert_tokens_to_ids(tk.THINK) in enc and hf.convert_tokens_to_ids(tk.END_THINK) in enc


@settings(max_examples=150, deadline=None)
@given(st.text(min_size=0, max_size=200))
def test_roundtrip_arbitrary_unicode(trained_hf_raw, text):
    # Byte-level BPE without normaliser: every string (surrogates excepted, which UTF-8 cannot
    # hold) decodes back exactly. The raw tokenizer encodes "<think>" inside text as text.
    ids = trained_hf_raw.encode(text, add_special_tokens=False).ids
    assert trained_hf_raw.decode(ids, skip_special_tokens=False) == text


@pytest.fixture(scope="module")
def trained_hf_raw(trained):
    raw = tk.load_raw_tokenizer(trained[1])
    raw.encode_special_tokens = True
    return raw


def test_roundtrip_code_byte_exact(trained):
    hf, _ = trained
    import inspect
    import json as json_mod

    src = inspect.getsource(json_mod.encoder) + "\n\t\tmixed\ttabs  \r\n  trailing   \n\n\n한국어 주석 # 中文 日本語\n"
    ids = hf.encode(src, add_special_tokens=False)
    assert hf.decode(ids).encode("utf-8") == src.encode("utf-8")


def test_pretokenizer_splits_digits_and_scripts(trained):
    hf, _ = trained
    pieces = [hf.decode([i]) for i in hf.encode("x=2024 API를", add_special_tokens=False)]
    assert "2" in pieces and "0" in pieces and "4" in pieces  # one digit per token
    assert not any(("API" in p and "를" in p) for p in pieces)  # no merge across scripts


def test_chat_template_thinking_and_non_thinking(trained):
    hf, _ = trained
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "two plus two"}]
    assert hf.apply_chat_template(msgs, tokenize=False) == (
        "<|system|>Be brief.<|eos|><|user|>2+2?<|eos|><|assistant|><think>two plus two</think>4<|eos|>")
    msgs[-1] = {"role": "assistant", "content": "4"}
    assert hf.apply_chat_template(msgs, tokenize=False) == (
        "<|system|>Be brief.<|eos|><|user|>2+2?<|eos|><|assistant|></think>4<|eos|>")
    prompt = [{"role": "user", "content": "hi"}]
    assert hf.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == \
        "<|user|>hi<|eos|><|assistant|><think>"
    assert hf.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, enable_thinking=False) == \
        "<|user|>hi<|eos|><|assistant|></think>"


def test_balanced_mixture_upsamples_small_language():
    sources = {"ko": {"kind": "konlpy", "weight": 0.5, "chunk_chars": 800},
               "code": {"kind": "python_stdlib", "weight": 0.5, "max_files": 200}}
    docs = list(tk.mixture_stream(sources, 600_000, seed=0, balanced=True))
    ko = sum(len(d.encode()) for d in docs if any("\uac00" <= c <= "\ud7a3" for c in d[:200]))
    total = sum(len(d.encode()) for d in docs)
    assert 0.4 < ko / total < 0.6  # Korean (170 KB on disk) is cycled up to its half of 600 KB
