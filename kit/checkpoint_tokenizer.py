"""The tokenizer a checkpoint speaks: it travels with the weights (issue 20).

Token ids mean something only to the weights trained on them. So every run directory keeps a
copy of the tokenizer its checkpoints were trained with (`<run>/tokenizer/`), an imported Hugging
Face checkpoint keeps its folder's tokenizer files and chat template (`<ckpt>/tokenizer/`), and a
stage that starts from a checkpoint encodes with that copy, not with the kit's configured
`tokenizer_dir` (which only a stage starting from scratch, or an old run without a copy, uses).

A tokenizer's identity is the sha256 of its tokenizer.json bytes: the same hash the curated data
manifests record (`tokenizer_sha256`, stages/curate.py), so data, checkpoints and DONE.json can
be compared. Files are copied byte for byte, never re-saved, so the hash survives every copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

# What a tokenizer folder holds (the kit's own and a released model's); absent ones are skipped.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "axk1_tokenizer_meta.json")
SUBDIR = "tokenizer"
META = "axk1_tokenizer_meta.json"
# The thinking-mode tags the kit's mode handling (rl.py, chat_data.py) is written for (SPEC 4).
THINK_TAGS = ("<think>", "</think>")


class TokenizerMismatch(ValueError):
    """Two things that must share token ids were made with different tokenizers (one line)."""


def tokenizer_hash(tok_dir: str | Path) -> str:
    path = Path(tok_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a tokenizer folder needs tokenizer.json")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def short(digest: str) -> str:
    return digest[:12]


def describe(tok_dir: str | Path) -> str:
    """`<dir> (<short hash>)`, the way stages print which tokenizer they encode with."""
    return f"{tok_dir} ({short(tokenizer_hash(tok_dir))})"


def carried_tokenizer(ckpt: str | Path) -> Path | None:
    """The tokenizer folder a checkpoint carries: its own (an import) or its run directory's
    (`<run>/checkpoints/step-N` -> `<run>/tokenizer`); None for a checkpoint without one."""
    ckpt = Path(ckpt)
    for folder in (ckpt, ckpt.parent, ckpt.parent.parent):
        if (folder / SUBDIR / "tokenizer.json").is_file():
            return folder / SUBDIR
    return None


def tokenizer_of(ckpt: str | Path | None, default_dir: str | Path) -> Path:
    """What a stage starting from `ckpt` encodes with: the checkpoint's own tokenizer, else the
    kit's configured one (kit checkpoints made before tokenizers travelled)."""
    carried = carried_tokenizer(ckpt) if ckpt is not None else None
    return carried if carried is not None else Path(default_dir)


def require_same(tok_a: str | Path, what_a: str, tok_b: str | Path, what_b: str) -> str:
    """Stop in one line naming both when two tokenizer folders differ; returns the shared hash."""
    hash_a, hash_b = tokenizer_hash(tok_a), tokenizer_hash(tok_b)
    if hash_a != hash_b:
        raise TokenizerMismatch(f"{what_a} was made with tokenizer {short(hash_a)} ({tok_a}) but {what_b} with "
                                f"tokenizer {short(hash_b)} ({tok_b}): token ids differ; use data/checkpoints "
                                f"of one tokenizer")
    return hash_a


def require_hash(digest: str, what: str, tok_dir: str | Path, what_tok: str) -> None:
    """Like require_same, for a thing that records only a hash (a data manifest's tokenizer_sha256)."""
    have = tokenizer_hash(tok_dir)
    if digest != have:
        raise TokenizerMismatch(f"{what} was made with tokenizer {short(digest)} but {what_tok} with tokenizer "
                                f"{short(have)} ({tok_dir}): token ids differ; re-tokenize the data with {tok_dir}")


def copy_files(src_dir: str | Path, dest_dir: str | Path) -> None:
    """Byte copies of a tokenizer folder's files (those it has of TOKENIZER_FILES) into dest_dir."""
    Path(dest_dir).mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copyfile(Path(src_dir) / name, Path(dest_dir) / name)


def copy_tokenizer(src_dir: str | Path, dest_parent: str | Path) -> Path:
    """Byte copies of the tokenizer files into `<dest_parent>/tokenizer` (built beside, then renamed)."""
    src, dest = Path(src_dir), Path(dest_parent) / SUBDIR
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    copy_files(src, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def stage_tokenizer(run_dir: str | Path, init: str | Path | None, default_dir: str | Path, rank: int) -> Path:
    """The tokenizer a training stage encodes with. A fresh start (init given, or none at all)
    takes the init checkpoint's (else `default_dir`) and copies it into the run directory (rank 0)
    so the run's checkpoints carry it; a resume (init None, the run has a copy) keeps the copy."""
    own = Path(run_dir) / SUBDIR
    if init is None and (own / "tokenizer.json").is_file():
        return own
    tok_dir = tokenizer_of(init, default_dir)
    if rank == 0:
        copy_tokenizer(tok_dir, run_dir)
    return tok_dir


def load(tok_dir: str | Path):
    """transformers tokenizer of a folder, with a pad id (a released tokenizer may have none: its
    meta's pad id, else eos, pads packed rows, which the loss masks anyway)."""
    import tokenizer as tokmod

    tok = tokmod.load_tokenizer(tok_dir)
    if tok.pad_token_id is None:
        meta = read_meta(tok_dir)
        tok.pad_token = tok.convert_ids_to_tokens(meta.get("pad_id", meta["eos_id"]))
    return tok


def read_meta(tok_dir: str | Path) -> dict:
    path = Path(tok_dir) / META
    return json.loads(path.read_text()) if path.is_file() else derive_meta(tok_dir)


def derive_meta(tok_dir: str | Path) -> dict:
    """The kit's tokenizer facts read off a released tokenizer: vocab size, bos/eos/pad ids and
    whether it has the thinking tags as single tokens (the chat template's thinking switch,
    `enable_thinking`, is used as the template writes it)."""
    import tokenizer as tokmod

    tok = tokmod.load_tokenizer(tok_dir)
    vocab = tok.get_vocab()
    if tok.eos_token_id is None:
        raise ValueError(f"{tok_dir}: the tokenizer names no eos_token (tokenizer_config.json): generation needs one")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return {"vocab_size": len(vocab), "bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id, "pad_id": pad,
            "special_ids": {t: vocab[t] for t in tok.all_special_tokens if t in vocab},
            "think_tags": [t for t in THINK_TAGS if t in vocab], "derived_from": "tokenizer files (import)"}


def import_tokenizer(hf_dir: str | Path, ckpt_dir: str | Path) -> dict:
    """Copy a released folder's tokenizer + chat template beside its imported weights; writes the
    kit's meta read off the tokenizer when the folder has none. Returns {sha256, dir, meta}."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{hf_dir}/tokenizer.json not found: the import needs the model's own tokenizer "
                                f"(its ids are what the weights were trained on)")
    dest = copy_tokenizer(hf_dir, ckpt_dir)
    if not (dest / META).is_file():
        (dest / META).write_text(json.dumps(derive_meta(dest), indent=2, ensure_ascii=False))
    return {"sha256": tokenizer_hash(dest), "dir": str(dest), "meta": read_meta(dest)}
