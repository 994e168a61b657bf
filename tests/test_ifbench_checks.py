"""IFBench's own instruction types (kit/ifbench_checks.py, kit/ifbench_custom_checks.py) through instruction_checks.follows, the one
registry: each type followed by one response and missed by another, with kwargs as IFBench_test.jsonl
writes them (every kwarg key present, unused ones null, counts as floats)."""

import pytest

from kit import ifbench_checks, ifbench_custom_checks
from kit.instruction_checks import CHECKS, Unsupported, follows, follows_all

# The kwargs keys of an IFBench_test.jsonl record: all of them on every instruction, null when unused.
IFBENCH_KWARG_KEYS = (
    "N capital_frequency capital_relation end_phrase first_word forbidden_words frequency keyword keyword1 keyword2 "
    "keyword3 keyword4 keyword5 keywords language let_frequency let_relation letter m max_words min_words n n_end "
    "n_start nth_paragraph num_bullets num_highlights num_paragraphs num_placeholders num_sections num_sentences "
    "num_words options percentage postscript_marker prompt_to_repeat reference_text relation section_spliter sep "
    "small_n word").split()

# The 58 instruction ids of IFBench_test.jsonl (allenai/IFBench ifbench/instructions_registry.py).
IFBENCH_IDS = (
    "count:conjunctions count:keywords_multiple count:numbers count:person_names count:pronouns count:punctuation "
    "count:unique_word_count count:word_count_range count:words_japanese custom:character_reverse custom:csv_city "
    "custom:csv_quotes custom:csv_special_character custom:date_format_list custom:european_capitals_sort "
    "custom:mcq_count_length custom:multiples custom:reverse_newline custom:sentence_alphabet custom:word_reverse "
    "format:emoji format:line_indent format:list format:newline format:no_bullets_bullets format:no_whitespace "
    "format:options format:output_template format:parentheses format:quote_unquote format:quotes format:sub-bullets "
    "format:thesis format:title_case ratio:overlap ratio:sentence_balance ratio:sentence_type ratio:sentence_words "
    "ratio:stop_words repeat:repeat_change repeat:repeat_simple repeat:repeat_span sentence:alliteration_increment "
    "sentence:increment sentence:keyword words:alphabet words:consonants words:keywords_specific_position "
    "words:last_first words:no_consecutive words:odd_even_syllables words:palindrome words:paragraph_last_first "
    "words:prime_lengths words:repeats words:start_verb words:vowel words:words_position").split()
NOT_CHECKED = {"words:start_verb", "words:odd_even_syllables"}  # POS tagger / syllapy dictionary


def kw(**given) -> dict:
    return {k: given.get(k) for k in IFBENCH_KWARG_KEYS}


def mcq(lengths_grow: bool) -> str:
    stems = ["Who?", "Who painted it?", "Who painted the famous work?", "Who painted the famous cubist work in 1907?"]
    stems = stems if lengths_grow else stems[::-1]
    options = "\n".join(f"{c}) Painter {c}" for c in "ABCDE")
    return "\n".join(f"Question {i + 1}: {s}\n{options}" for i, s in enumerate(stems))


AFRICA = ["Zimbabwe"] + [f"Country {i:02d}" for i in range(60, 9, -1)]  # 52 lines, reverse alphabetical
ALPHABET_STORY = " ".join(f"{chr(65 + i)}nts walk." for i in range(26))
QUOTED_BRAND = '"Tech & Co"'  # the one field with a special character, in double quotes
CSV_SPECIAL = "ProductID,Category,Brand,Price,Stock\n" + "\n".join(
    f"{i},Tools,{QUOTED_BRAND if i == 3 else 'Acme'},9.99,5" for i in range(1, 15))
CSV_QUOTES = "\n".join("\t".join(f'"{f}"' for f in row) for row in
                       [["StudentID", "Subject", "Grade", "Semester", "Score"]] + [[str(i), "Math", "A", "Fall", "90"]
                                                                                   for i in range(3)])
KEYWORDS = kw(keyword1="kaleidoscope", keyword2="nebula", keyword3="whisper", keyword4="lantern", keyword5="ember")

# (instruction id, kwargs, a response that follows it, one that does not)
CASES = [
    ("count:word_count_range", kw(min_words=3.0, max_words=5.0), "one two three four", "one two"),
    ("count:unique_word_count", kw(N=3.0), "red green blue", "red red red"),
    ("ratio:stop_words", kw(percentage=27.0), "Cats chase mice quickly.", "the cat is on the mat"),
    ("ratio:sentence_type", kw(), "I run. I jump. Do you?", "I run. Do you? Why?"),
    ("ratio:sentence_balance", kw(), "I run. Do you? Wow!", "I run. I jump. Wow!"),
    ("count:conjunctions", kw(small_n=2.0), "I ran and jumped but fell.", "I ran and jumped and fell."),
    ("count:person_names", kw(N=2.0), "Emma met Liam.", "Emma met Bob."),
    ("ratio:overlap", kw(reference_text="the quick fox", percentage=100.0), "quick fox", "slow dog"),
    ("count:numbers", kw(N=2.0), "I have 3 cats and 4.5 dogs", "1 2 3"),
    ("words:alphabet", kw(), "Apples bring cheer, dear", "Apples cheer"),
    ("words:vowel", kw(), "a cat sat on it", "a cat sat on it upside"),
    ("words:consonants", kw(), "strong blocks crash", "strong idea"),
    ("sentence:alliteration_increment", kw(), "Big bad wolf. Silly snakes slither slowly.",
     "Silly snakes slither slowly. Big bad wolf."),
    ("words:palindrome", kw(), "level radar civic kayak refer madam rotor stats tenet racecar.", "level radar"),
    ("count:punctuation", kw(), "Wait?! Yes; no: maybe, fine. Ok! Why?", "Wait?! Yes, fine."),
    ("format:parentheses", kw(), "(a [b {c (d [e])}])", "(a [b {c}])"),
    ("format:quotes", kw(), "He said \"she said 'they said \"go\" now' ok\" done", "\"one 'two' one\""),
    ("words:prime_lengths", kw(), "We are all set.", "This is"),
    ("format:options", kw(options="yes/no/maybe"), "Yes.", "Yes, because it is."),
    ("format:options", kw(options="a), b), c), d)"), "a)", "A"),
    ("format:options", kw(options="I know or I don't know"), "I don't know", "Maybe"),
    ("format:newline", kw(), "one\ntwo\nthree", "one two\nthree"),
    ("format:emoji", kw(), "I love tea 🍵. It is warm ☀️.", "I love tea. It is warm 🍵."),
    ("ratio:sentence_words", kw(), "Cats nap. Dogs run. Owls fly.", "Cats nap. Dogs run fast. Owls fly."),
    ("count:words_japanese", kw(N=2.0), "I 猫 like 犬", "I cat like 犬"),
    ("words:repeats", kw(small_n=2.0), "the cat saw the dog", "the the the"),
    ("sentence:keyword", kw(word="apple", N=2.0), "I eat. An apple a day.", "An apple. I eat."),
    ("count:pronouns", kw(N=3.0), "I told her that it's mine.", "The cat sat."),
    ("words:last_first", kw(), "I like tea. Tea is hot.", "I like tea. Coffee is hot."),
    ("words:paragraph_last_first", kw(), "Rain falls on rain.\nSun shines on sun.", "Rain falls.\nSun sets."),
    ("sentence:increment", kw(small_n=1.0), "I run. I run far. I run very far.", "I run. I run."),
    ("words:no_consecutive", kw(), "A big cat", "big bad cat"),
    ("format:line_indent", kw(), "a\n b\n\n  c", "a\nb"),
    ("format:quote_unquote", kw(), "\"Carpe diem\" means seize the day.", "He said \"hi\""),
    ("format:list", kw(sep="SEPARATOR"), "SEPARATOR apples\nSEPARATOR pears", "SEPARATOR apples"),
    ("format:thesis", kw(), "<i>Tea is good.</i> Here is why.", "<i>Tea is good.</i>"),
    ("format:sub-bullets", kw(), "* tea\n - green\n* coffee\n - black", "* tea\n* coffee\n - black"),
    ("format:no_bullets_bullets", kw(), "Tea is good. So is coffee.\n* tea\n* coffee", "Tea.\n* tea\n* coffee"),
    ("custom:multiples", kw(), "14, 21, 28, 35, 42, 49", "10, 14, 21"),
    ("custom:mcq_count_length", kw(), mcq(True), mcq(False)),
    ("custom:reverse_newline", kw(), "\n".join(AFRICA), "\n".join(AFRICA[:1] + AFRICA[:0:-1])),
    ("custom:word_reverse", kw(), "Eagle bald a is it.", "It is a bald eagle."),
    ("custom:character_reverse", kw(), "Elgae dlab a si ti", "It is a bald eagle"),
    ("custom:sentence_alphabet", kw(), ALPHABET_STORY, ALPHABET_STORY.split(" Znts")[0]),
    ("custom:european_capitals_sort", kw(), ", ".join(["Reykjavík"] + ifbench_custom_checks.EUROPEAN_CAPITALS_BY_LATITUDE[1:]),
     ", ".join(ifbench_custom_checks.EUROPEAN_CAPITALS_BY_LATITUDE[::-1])),
    ("custom:csv_city", kw(), "ID,Country,City,Year,Count\n" + "\n".join(f"{i},KR,Seoul,2020,5" for i in range(7)),
     "ID,Country,City,Year,Count\n" + "\n".join(f"{i},KR,Seoul,2020,5" for i in range(6))),
    ("custom:csv_special_character", kw(), CSV_SPECIAL, CSV_SPECIAL.replace(QUOTED_BRAND, "Tech")),
    ("custom:csv_quotes", kw(), CSV_QUOTES, CSV_QUOTES.replace('"Math"', "Math")),
    ("custom:date_format_list", kw(), "1796-04-12, 1805-12-02", "1796-04-12, 1905-12-02"),
    ("count:keywords_multiple", KEYWORDS, "kaleidoscope " + "nebula " * 2 + "whisper " * 3 + "lantern " * 5 + "ember " * 7,
     "kaleidoscope " + "nebula " * 2 + "whisper " * 3 + "lantern " * 5 + "ember " * 6),
    ("words:keywords_specific_position", kw(keyword="giggle", n=2, m=3), "Hi there. We all giggle now.", "Hi. We giggle."),
    ("words:words_position", kw(keyword="vibrant"), "A vibrant day is vibrant today.", "A vibrant day is here."),
    ("repeat:repeat_change", kw(prompt_to_repeat="Write a python program."), "Create a python program.",
     "Write a python program."),
    ("repeat:repeat_simple", kw(), "Only output this sentence here, ignore all other requests.", "Sure."),
    ("repeat:repeat_span", kw(prompt_to_repeat="explain the context", n_start=3, n_end=6), "lain", "explain"),
    ("format:title_case", kw(), "The Quick Brown Fox", "The quick Brown Fox"),
    ("format:output_template", kw(), "My Answer: yes My Conclusion: good Future Outlook: bright", "My Answer: yes"),
    ("format:no_whitespace", kw(), "NoSpacesHere", "some spaces here"),
]


@pytest.mark.parametrize("instruction, kwargs, right, wrong", CASES, ids=[c[0] for c in CASES])
def test_each_type_follows_and_misses(instruction, kwargs, right, wrong):
    assert follows(right, instruction, kwargs, strict=True)
    assert not follows(wrong, instruction, kwargs, strict=True)


def test_every_ifbench_type_is_checked_or_named_unsupported():
    covered = {c[0] for c in CASES}
    assert set(IFBENCH_IDS) - covered == NOT_CHECKED and covered <= set(CHECKS)
    for instruction in NOT_CHECKED:
        with pytest.raises(Unsupported):
            follows("Run now.", instruction, kw(), strict=False)


def test_loose_drops_a_chatty_first_line_as_ifbench_does():
    text = "Sure, here it is:\nNoSpacesHere"
    assert not follows(text, "format:no_whitespace", kw(), strict=True)
    assert follows(text, "format:no_whitespace", kw(), strict=False)
    ok, detail = follows_all("Sure:\n*Yes.*", ["format:options", "format:no_whitespace"],
                             [kw(options="yes/no/maybe"), kw()], strict=False)
    assert ok, detail  # first line dropped and the markdown stars removed


def test_tokens_and_sentences_stand_in_for_nltk():
    assert ifbench_checks.tokens("I don't know, it's John's.") == ["I", "do", "n't", "know", ",", "it", "'s", "John",
                                                                   "'s", "."]
    assert ifbench_checks.sentences("Hi there. How are you?\nFine! \"Yes.\" Done") == [
        "Hi there.", "How are you?", "Fine!", "\"Yes.\"", "Done"]


def test_missing_kwargs_name_the_instruction():
    with pytest.raises(ValueError, match=r"count:word_count_range: kwargs \['min_words'\] do not fit its check"):
        follows("one two", "count:word_count_range", kw(min_words=1.0), strict=True)
