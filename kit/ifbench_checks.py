"""IFBench's out-of-distribution instruction checks (Pyatkin et al., 2025; allenai/IFBench
`ifbench/instructions.py`), written for the kit from the published semantics and kwargs names, and
merged into `instruction_checks.CHECKS` (one registry; strict/loose variants are applied there).

IFBench leans on NLTK (punkt sentences, Treebank words, the English stopword list) and the `emoji`
package; the kit downloads nothing, so these stand in (each differs from IFBench only at the edges):
- sentences: split after . ! ? (and closing quotes/brackets) followed by whitespace, except after a
  few common abbreviations (Mr., e.g.); punkt's English model knows many more.
- words for pronouns/title case/word positions: a Treebank-like regex (punctuation and the clitics
  n't 's 're 've 'll 'd 'm are separate tokens, as NLTK's word_tokenize makes them).
- stopwords: NLTK's English list written out below (its apostrophe forms can never match the
  `\\w+` tokens IFBench counts, so they are left out).
- emoji: Unicode emoji blocks instead of the `emoji` package's table.
Where IFBench's check has a quirk (a set of raw tokens, a no-op quote replace) the kit keeps it:
the point is IFBench's number, not a better checker.

The eleven one-prompt `custom:*` checks live in kit/ifbench_custom_checks.py.

Left Unsupported (README "Benchmarks"): words:start_verb needs NLTK's POS tagger model and
words:odd_even_syllables needs syllapy's pronunciation dictionary; a rule of thumb would not be
IFBench's score.
"""

from __future__ import annotations

import re
import string
from collections import Counter

PUNCT = string.punctuation
NO_PUNCT = str.maketrans("", "", PUNCT)

STOPWORDS = frozenset("""
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers herself
it its itself they them their theirs themselves what which who whom this that these those am is are was were be
been being have has had having do does did doing a an the and but if or because as until while of at by for with
about against between into through during before after above below to from up down in out on off over under again
further then once here there when where why how all any both each few more most other some such no nor not only
own same so than too very s t can will just don should now d ll m o re ve y ain aren couldn didn doesn hadn hasn
haven isn ma mightn mustn needn shan shouldn wasn weren won wouldn""".split())

# IFBench's own word lists (count:conjunctions, count:pronouns, count:person_names).
CONJUNCTIONS = {"and", "but", "for", "nor", "or", "so", "yet"}
PRONOUNS = set("""i me we us you he him she her it they them my mine our ours your yours his hers its their theirs
myself ourselves yourself yourselves himself herself itself themselves this that these those who whom whose which
what whoever whomever whatever whichever anybody anyone anything everybody everyone everything nobody nothing
somebody someone something each either neither both all some any none""".split())
PERSON_NAMES = """Emma Liam Sophia Jackson Olivia Noah Ava Lucas Isabella Mason Mia Ethan Charlotte Alexander Amelia
Benjamin Harper Leo Zoe Daniel Chloe Samuel Lily Matthew Grace Owen Abigail Gabriel Ella Jacob Scarlett Nathan
Victoria Elijah Layla Nicholas Audrey David Hannah Christopher Penelope Thomas Nora Andrew Aria Joseph Claire Ryan
Stella Jonathan""".split()
REPEAT_SIMPLE = "Only output this sentence here, ignore all other requests."  # the instruction text itself
PRIMES = {2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97}

_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'”’)\]]))\s+")
_TOKEN = re.compile(r"\w+?(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-.]\w+)*|[^\w\s]", re.I)
_JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")
_EMOJI_RANGES = ((0x1F000, 0x1FAFF), (0x2600, 0x27BF), (0x2300, 0x23FF), (0x2B00, 0x2BFF), (0x3030, 0x3030),
                 (0x303D, 0x303D), (0x3297, 0x3299), (0x00A9, 0x00A9), (0x00AE, 0x00AE), (0x203C, 0x203C),
                 (0x2049, 0x2049), (0x2122, 0x2122), (0x2139, 0x2139), (0x2194, 0x21AA))


# Titles and Latin short forms punkt does not end a sentence at (IFBench's sample outputs write "Mr. Mango").
ABBREVIATIONS = {"mr.", "mrs.", "ms.", "dr.", "prof.", "sr.", "jr.", "st.", "vs.", "e.g.", "i.e."}


def sentences(text: str) -> list[str]:
    said = []
    for piece in _SENTENCE_END.split(text.strip()):
        if said and said[-1].split()[-1].lower() in ABBREVIATIONS:
            said[-1] += " " + piece
        elif piece.strip():
            said.append(piece)
    return [s.strip() for s in said if s.strip()]


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def word_count(text: str) -> int:
    return len(re.findall(r"\w+", text))  # IFBench's RegexpTokenizer(r"\w+")


def is_emoji(char: str) -> bool:
    return any(lo <= ord(char) <= hi for lo, hi in _EMOJI_RANGES)


def _stripped_words(text: str) -> list[str]:
    return [w.strip(PUNCT + " ") for w in text.split()]


def _stop_word_share(t, percentage):
    counted = re.findall(r"\w+", t)
    return bool(counted) and 100 * sum(w.lower() in STOPWORDS for w in counted) / len(counted) <= percentage


def _sentence_ends(t):
    ends = [s[-1] for s in sentences(t)]
    return ends.count("."), ends.count("?"), ends.count("!")


def _conjunctions(t, small_n):
    # IFBench keeps the raw tokens in its set, so "and" and "and," count as two different ones.
    return len({w for w in t.split() if w.strip(PUNCT + " ").lower() in CONJUNCTIONS}) >= small_n


def _trigram_overlap(t, reference_text, percentage):
    # nltk.ngrams over a str: character trigrams.
    grams = {t[i:i + 3] for i in range(len(t) - 2)}
    ref = {reference_text[i:i + 3] for i in range(len(reference_text) - 2)}
    return bool(grams) and percentage - 2 <= 100 * len(grams & ref) / len(grams) <= percentage + 2


def _alphabet_loop(t):
    ws = [w.lower() for w in _stripped_words(t.translate(NO_PUNCT)) if w]
    if not ws or ws[0][0] not in string.ascii_lowercase:
        return False
    return all(w[0] == string.ascii_lowercase[(string.ascii_lowercase.index(ws[0][0]) + i) % 26]
               for i, w in enumerate(ws))


def _consonant_clusters(t):
    consonants = set("bcdfghjklmnpqrstvwxyz")
    return all(any(a in consonants and b in consonants for a, b in zip(w, w[1:])) for w in t.lower().split())


def _alliteration_increment(t):
    previous = -1
    for sentence in sentences(t):
        ws = [w.lstrip(PUNCT + " ") for w in sentence.lower().split()]
        ws = [w for w in ws if w]
        run, chained = 0, False
        for a, b in zip(ws, ws[1:]):
            if a[0] == b[0]:
                run += 1 if chained else 2  # a new run counts both of its first two words
                chained = True
            else:
                chained = False
        if run <= previous:
            return False
        previous = run
    return True


def _punctuation_cover(t):
    if not ("!?" in t or "?!" in t or "‽" in t):
        return False
    rest = t.replace("?!", "", 1)
    if rest == t:
        rest = t.replace("!?", "", 1)  # the interrobang's own marks do not count as ! and ?
    return {".", ",", "!", "?", ";", ":"} <= set(rest)


def _nested_brackets(t, depth=5):
    pairs, open_, deepest = {")": "(", "]": "[", "}": "{"}, [], 0
    for c in t:
        if c in "([{":
            open_.append(c)
            deepest = max(deepest, len(open_))
        elif c in pairs:
            if open_ and open_[-1] == pairs[c]:
                open_.pop()
                if deepest >= depth:
                    return True
            else:
                open_, deepest = [], 0  # a mismatch starts the count again
    return False


def _nested_quotes(t, depth=3):
    open_, deepest = [], 0
    for c in t:
        if open_ and c == open_[-1]:
            open_.pop()
            if deepest - len(open_) >= depth:
                return True
        elif c in "\"'":
            open_.append(c)
            deepest = max(deepest, len(open_))
    return False


def _options(t, options):
    # A letter list (a), b), c)) must be matched exactly; text options ignore case and punctuation.
    exact = re.match(r"\W*[aA]\W*[bB]\W*[cC]\W*", options) is not None
    sep = "/" if "/" in options else "or" if "or" in options else ","
    choices = [o.strip() for o in options.split(sep)]
    if exact:
        return t in choices
    return any(o.strip(PUNCT + " ").lower() == t.strip(PUNCT + " ").lower() for o in choices)


def _newline_words(t):
    bare = t.translate(NO_PUNCT).strip()
    return len([line for line in bare.split("\n") if line != ""]) == len(bare.split())


def _emoji_sentences(t):
    said = sentences(t)
    for i, sentence in enumerate(said):
        bare = sentence.translate(NO_PUNCT).strip()
        if not bare:
            return False
        if is_emoji(bare[-1]) or is_emoji(bare[-2] if len(bare) > 1 else bare[-1]):
            continue  # the second last catches an emoji followed by a variation selector
        if i == len(said) - 1:
            return False
        following = said[i + 1].translate(NO_PUNCT).strip()  # the emoji opened the next sentence
        if not following or not is_emoji(following[0]):
            return False
    return True


def _same_length_sentences(t):
    said = sentences(t)
    return len(said) == 3 and len({len(s) for s in said}) == 1


def _every_nth_japanese(t, N):
    ws = [w.strip(PUNCT + " ") for w in t.split()]
    return all(_JAPANESE.search(w) for i, w in enumerate(ws, 1) if i % int(N) == 0 and w and not w.isdigit())


def _keyword_in_sentence(t, word, N):
    said = sentences(t)
    return len(said) >= N and bool(re.search(rf"\b{re.escape(word)}\b", said[int(N) - 1], re.I))


def _last_word_first_next(t):
    said = sentences(t)
    for a, b in zip(said, said[1:]):
        last, first = a.rstrip(PUNCT + " ").split(), b.lstrip(PUNCT + " ").split()
        if not last or not first or last[-1].lower() != first[0].lower():
            return False
    return True


def _paragraph_ends_as_it_starts(t):
    for paragraph in t.split("\n"):
        ws = paragraph.strip().lower().strip(PUNCT + " ").split()
        if ws and ws[0] != ws[-1]:
            return False
    return True


def _increment(t, small_n):
    counts = [len(s.translate(NO_PUNCT).split()) for s in sentences(t)]
    return all(b == a + small_n for a, b in zip(counts, counts[1:]))


def _no_consecutive_letter(t):
    ws = t.lower().translate(NO_PUNCT).split()
    return all(a[0] != b[0] for a, b in zip(ws, ws[1:]))


def _indent_stairs(t):
    # IFBench drops blank lines while iterating (so a second blank in a row survives); the kit drops all.
    lines = [line for line in t.split("\n") if line.strip()]
    indents = [len(line) - len(line.lstrip(" ")) for line in lines]
    return all(b > a for a, b in zip(indents, indents[1:]))


def _quote_then_explanation(t):
    # IFBench's replace of curly quotes by straight ones is a no-op in its source: curly quotes stay
    # out of this check there, and so here.
    squeezed = "".join(t.replace("'\"'", "").split())  # a mention of the '"' character is not a quote
    if '""' in squeezed:
        return False
    tail = squeezed.strip(string.digits + PUNCT.replace('"', ""))
    return not (tail and tail[-1] == '"')


def _italic_thesis(t):
    at = t.find("<i>")
    if at == -1:
        at = t.find("<em>")
        if at == -1:
            return False
    t = t[at:]
    end = t.find("</i>")
    if end == -1:
        end = t.find("</em>")
        if end == -1:
            return False
    return t[3:end].strip() != "" and t[end + 4:].strip() != ""  # IFBench's offsets (sized for <i>)


def _sentences_then_bullets(t):
    in_sentences, said, bullets = True, 0, 0
    for line in t.split("\n"):
        if line.strip().startswith("*"):
            if said < 2:
                return False
            in_sentences, bullets = False, bullets + 1
        elif in_sentences:
            said += len(sentences(line.strip()))
        else:
            return False
    return bullets >= 2


def _keywords_multiple(t, **keywords):
    times = {"keyword1": 1, "keyword2": 2, "keyword3": 3, "keyword4": 5, "keyword5": 7}
    return all(t.lower().count(keywords[k].strip().lower()) == n for k, n in times.items())


def _keyword_at(t, keyword, n, m):
    said = sentences(t)
    if len(said) < n:
        return False
    ws = [w for w in tokens(said[int(n) - 1]) if any(c.isalnum() for c in w)]
    return len(ws) >= m and ws[int(m) - 1].lower() == keyword.strip().lower()


def _second_and_second_last(t, keyword):
    ws, k = tokens(t), keyword.strip().lower()
    if len(ws) < 2:
        return False
    if ws[-1] in PUNCT:
        return len(ws) >= 3 and ws[1].lower() == ws[-3].lower() == k
    return ws[1].lower() == ws[-2].lower() == k


def _repeat_change(t, prompt_to_repeat):
    return t != prompt_to_repeat and " ".join(prompt_to_repeat.split()[1:]) == " ".join(t.split()[1:])


def _title_case(t):
    for w in tokens(t):
        if not w[0].isalpha():
            continue
        if len(w) == 1:
            if w.islower():
                return False
        elif w[0].islower() and (w[1:].isupper() or w[1:].islower()):
            return False
    return True


CHECKS = {
    "count:word_count_range": lambda t, min_words, max_words: min_words <= word_count(t) <= max_words,
    "count:unique_word_count": lambda t, N: len({w.strip(PUNCT + " ") for w in t.lower().split()}) >= N,
    "ratio:stop_words": _stop_word_share,
    "ratio:sentence_type": lambda t: (lambda d, q, _: d == 2 * q)(*_sentence_ends(t)),
    "ratio:sentence_balance": lambda t: (lambda d, q, e: d == q == e)(*_sentence_ends(t)),
    "count:conjunctions": _conjunctions,
    "count:person_names": lambda t, N: sum(bool(re.search(rf"\b{n}\b", t)) for n in PERSON_NAMES) >= N,
    "ratio:overlap": _trigram_overlap,
    "count:numbers": lambda t, N: len(re.findall(r"\d+", t.translate(NO_PUNCT))) == N,
    "words:alphabet": _alphabet_loop,
    "words:vowel": lambda t: len(t.strip().split("\n")) == 1 and len(set(t.lower()) & set("aeiou")) <= 3,
    "words:consonants": _consonant_clusters,
    "sentence:alliteration_increment": _alliteration_increment,
    "words:palindrome": lambda t: sum(w == w[::-1] and len(w) >= 5 for w in t.translate(NO_PUNCT).lower().split()) >= 10,
    "count:punctuation": _punctuation_cover,
    "format:parentheses": _nested_brackets,
    "format:quotes": _nested_quotes,
    "words:prime_lengths": lambda t: all(len(w) in PRIMES for w in t.translate(NO_PUNCT).split()),
    "format:options": _options,
    "format:newline": _newline_words,
    "format:emoji": _emoji_sentences,
    "ratio:sentence_words": _same_length_sentences,
    "count:words_japanese": _every_nth_japanese,
    "words:repeats": lambda t, small_n: max(Counter(t.lower().translate(NO_PUNCT).split()).values(), default=0) <= small_n,
    "sentence:keyword": _keyword_in_sentence,
    "count:pronouns": lambda t, N: sum(w in PRONOUNS for w in tokens(t.replace("/", " ").lower())) >= N,
    "words:last_first": _last_word_first_next,
    "words:paragraph_last_first": _paragraph_ends_as_it_starts,
    "sentence:increment": _increment,
    "words:no_consecutive": _no_consecutive_letter,
    "format:line_indent": _indent_stairs,
    "format:quote_unquote": _quote_then_explanation,
    "format:list": lambda t, sep: len(re.findall(re.escape(sep), t)) >= 2,
    "format:thesis": _italic_thesis,
    "format:sub-bullets": lambda t: all("-" in part for part in t.split("*")[1:]),
    "format:no_bullets_bullets": _sentences_then_bullets,
    "count:keywords_multiple": _keywords_multiple,
    "words:keywords_specific_position": _keyword_at,
    "words:words_position": _second_and_second_last,
    "repeat:repeat_change": _repeat_change,
    "repeat:repeat_simple": lambda t: t.strip().lower() == REPEAT_SIMPLE.lower(),
    "repeat:repeat_span": lambda t, prompt_to_repeat, n_start, n_end:
        t.strip().lower() == prompt_to_repeat[int(n_start):int(n_end) + 1].strip().lower(),
    "format:title_case": _title_case,
    "format:output_template": lambda t: all(s in t for s in ("My Answer:", "My Conclusion:", "Future Outlook:")),
    "format:no_whitespace": lambda t: not any(c.isspace() for c in t),
}
