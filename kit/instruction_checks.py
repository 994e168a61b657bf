"""IFEval's verifiable instructions (Zhou et al., 2023) as rule checks, without NLTK: words are
`\\w+` runs, sentences end at . ! ? followed by space or the end (IFEval's own word count is the
same \\w+ tokenizer; its sentence splitter is a regex too, NLTK only served its data download).

    follows_all(response, ["punctuation:no_comma"], [{}], strict=True)  # -> (True, "1/1 followed")

strict: the response as given (IFEval prompt-strict). loose (IFBench prompt-loose, IFEval's loose
metric): an instruction counts as followed if any of 8 variants passes (first/last line removed,
markdown `*` removed). IFBench's own types (kit/ifbench_checks.py, kit/ifbench_custom_checks.py) join
the same CHECKS registry. An instruction id the kit has no check for raises Unsupported: the item is
left out of the score and counted in the row (README "Benchmarks"), never scored silently.
"""

from __future__ import annotations

import inspect
import json
import re
import unicodedata

from kit import ifbench_checks, ifbench_custom_checks


class Unsupported(KeyError):
    pass


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if words(s)]


def _compare(count: int, relation: str, target: int) -> bool:
    if relation == "less than":
        return count < target
    if relation == "at least":
        return count >= target
    raise ValueError(f"relation={relation!r}: IFEval uses 'less than' or 'at least'")


# Unicode script of each non-Latin language IFEval asks for; Latin-script languages are only told
# apart from non-Latin ones (IFEval itself uses langdetect; see README "Benchmarks").
SCRIPTS = {"ko": "HANGUL", "ja": ("HIRAGANA", "KATAKANA", "CJK"), "zh": "CJK", "ru": "CYRILLIC", "uk": "CYRILLIC",
           "bg": "CYRILLIC", "ar": "ARABIC", "fa": "ARABIC", "ur": "ARABIC", "hi": "DEVANAGARI", "mr": "DEVANAGARI",
           "ne": "DEVANAGARI", "bn": "BENGALI", "th": "THAI", "el": "GREEK", "he": "HEBREW", "ta": "TAMIL",
           "te": "TELUGU", "kn": "KANNADA", "gu": "GUJARATI", "pa": "GURMUKHI"}


def in_language(text: str, language: str) -> bool:
    letters = [unicodedata.name(c, "") for c in text if c.isalpha()]
    if not letters:
        return False
    script = SCRIPTS.get(language, "LATIN")
    names = (script,) if isinstance(script, str) else script
    share = sum(any(n.startswith(s) for s in names) for n in letters) / len(letters)
    return share > 0.5


def _paragraphs_by_stars(text: str) -> list[str] | None:
    parts = re.split(r"\s?\*\*\*\s?", text)
    if any(not p.strip() for p in parts[1:-1]):
        return None  # an empty paragraph between two separators
    return [p for p in parts if p.strip()]


def _nth_paragraph(text, num_paragraphs, nth_paragraph, first_word) -> bool:
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(paragraphs) != num_paragraphs or nth_paragraph > len(paragraphs):
        return False
    head = words(paragraphs[nth_paragraph - 1])
    return bool(head) and head[0].lower() == first_word.lower()


def _json(text: str) -> bool:
    body = re.sub(r"^```(?:json|Json|JSON)?\s*|\s*```$", "", text.strip())
    try:
        json.loads(body)
        return True
    except ValueError:
        return False


def _two_responses(text: str) -> bool:
    parts = [p.strip() for p in text.split("******")]
    return len(parts) == 2 and all(parts) and parts[0] != parts[1]


CHECKS = {
    "keywords:existence": lambda t, keywords: all(re.search(re.escape(k), t, re.I) for k in keywords),
    "keywords:frequency": lambda t, keyword, frequency, relation:
        _compare(len(re.findall(re.escape(keyword), t, re.I)), relation, frequency),
    "keywords:forbidden_words": lambda t, forbidden_words:
        not any(re.search(r"\b" + re.escape(w) + r"\b", t, re.I) for w in forbidden_words),
    "keywords:letter_frequency": lambda t, letter, let_frequency, let_relation:
        _compare(t.lower().count(letter.lower()), let_relation, let_frequency),
    "language:response_language": lambda t, language: in_language(t, language),
    "length_constraints:number_sentences": lambda t, num_sentences, relation:
        _compare(len(sentences(t)), relation, num_sentences),
    "length_constraints:number_paragraphs": lambda t, num_paragraphs:
        (_paragraphs_by_stars(t) or []).__len__() == num_paragraphs,
    "length_constraints:number_words": lambda t, num_words, relation: _compare(len(words(t)), relation, num_words),
    "length_constraints:nth_paragraph_first_word": _nth_paragraph,
    "detectable_content:number_placeholders": lambda t, num_placeholders:
        len(re.findall(r"\[.*?\]", t)) >= num_placeholders,
    "detectable_content:postscript": lambda t, postscript_marker:
        bool(re.search(r"^\s*" + re.escape(postscript_marker.lower()).replace(r"\ ", r"\s?") + r".*$", t.lower(), re.M)),
    "detectable_format:number_bullet_lists": lambda t, num_bullets:
        len(re.findall(r"^\s*\*[^\*].*$", t, re.M)) + len(re.findall(r"^\s*-.*$", t, re.M)) == num_bullets,
    "detectable_format:constrained_response": lambda t:
        any(o in t for o in ("My answer is yes.", "My answer is no.", "My answer is maybe.")),
    "detectable_format:number_highlighted_sections": lambda t, num_highlights:
        len([h for h in re.findall(r"\*[^\n\*]*\*", t) if h.strip("*").strip()])
        + len([h for h in re.findall(r"\*\*[^\n\*]*\*\*", t) if h.strip("*").strip()]) >= num_highlights,
    "detectable_format:multiple_sections": lambda t, section_spliter, num_sections:
        len(re.split(r"\s?" + re.escape(section_spliter) + r"\s?\d+\s?", t)) - 1 >= num_sections,
    "detectable_format:json_format": lambda t: _json(t),
    "detectable_format:title": lambda t: bool(re.search(r"<<[^\n]+>>", t)),
    "combination:two_responses": lambda t: _two_responses(t),
    "combination:repeat_prompt": lambda t, prompt_to_repeat:
        t.strip().lower().startswith(prompt_to_repeat.strip().lower()),
    "startend:end_checker": lambda t, end_phrase: t.strip().lower().endswith(end_phrase.strip().lower()),
    "startend:quotation": lambda t: len(t.strip()) > 1 and t.strip()[0] == '"' and t.strip()[-1] == '"',
    "change_case:capital_word_frequency": lambda t, capital_frequency, capital_relation:
        _compare(sum(w.isupper() for w in words(t)), capital_relation, capital_frequency),
    "change_case:english_capital": lambda t: t.isupper() and in_language(t, "en"),
    "change_case:english_lowercase": lambda t: t.islower() and in_language(t, "en"),
    "punctuation:no_comma": lambda t: "," not in t,
}
CHECKS |= ifbench_checks.CHECKS | ifbench_custom_checks.CHECKS  # IFBench's own types: one registry for follows() and the left-out count


def loose_variants(text: str) -> list[str]:
    lines = text.split("\n")
    cut = [text, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return cut + [v.replace("*", "") for v in cut]


def follows(text: str, instruction: str, kwargs: dict, strict: bool) -> bool:
    if instruction not in CHECKS:
        raise Unsupported(instruction)
    args = {k: v for k, v in (kwargs or {}).items() if v is not None}
    check = CHECKS[instruction]
    try:
        inspect.signature(check).bind("", **args)
    except TypeError as e:  # IFEval/IFBench draw a missing kwarg at random; a scored file must carry it
        raise ValueError(f"{instruction}: kwargs {sorted(args)} do not fit its check ({e})") from None
    candidates = [text] if strict else loose_variants(text)
    return any(v.strip() and check(v, **args) for v in candidates)


def follows_all(text: str, instructions: list[str], kwargs: list[dict], strict: bool) -> tuple[bool, str]:
    """Prompt-level: every instruction followed. Unsupported propagates (the caller counts it)."""
    missed = [i for i, k in zip(instructions, kwargs) if not follows(text, i, k, strict)]
    return not missed, f"missed {', '.join(missed)}" if missed else f"{len(instructions)}/{len(instructions)} followed"
