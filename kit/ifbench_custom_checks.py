"""IFBench's eleven `custom:*` instructions: each belongs to one fixed prompt of IFBench_test.jsonl
(Napoleon's battle dates, Africa's countries in reverse, CSV tables, ...) and takes no kwargs; the
checks follow allenai/IFBench `ifbench/instructions.py`, written for the kit (see kit/ifbench_checks.py
for the NLTK stand-ins they share). Merged into `instruction_checks.CHECKS` with the other IFBench types.
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata

from kit.ifbench_checks import NO_PUNCT, PUNCT, sentences

# IFBench's expected answer: the capitals north of 45 degrees, from the highest latitude down.
EUROPEAN_CAPITALS_BY_LATITUDE = """Reykjavik Helsinki Oslo Tallinn Stockholm Riga Moscow Copenhagen Vilnius Minsk
Dublin Berlin Amsterdam Warsaw London Brussels Prague Luxembourg Paris Vienna Bratislava Budapest Vaduz Chisinau Bern
Ljubljana Zagreb""".split()


def _mcq(t):
    if t[t.find("Question"):] != t:
        return False  # anything before the first question is an explanation
    questions = re.split(r"\n*(?:Question \d+[\.|\):;]?\s*)", t)
    questions = [q.strip() for q in (questions[1:] if questions[0] == "" else questions) if q.strip()]
    if len(questions) != 4:
        return False
    lengths = []
    for q in questions:
        text, options, in_options = "", 0, False
        for line in q.split("\n"):
            if re.match(r"^[A-Ea-e][\.|\)]\s*\w+", line.strip()):
                options, in_options = options + 1, True
            elif not in_options:
                text += " " + line.strip()
        if options != 5:
            return False
        lengths.append(len(text.strip()))
    return all(a < b for a, b in zip(lengths, lengths[1:]))


def _ascii(text):
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def _africa_reversed(t):
    lines = [line.strip(PUNCT + " ") for line in t.split("\n") if line.strip(PUNCT + " ")]
    start = next((i for i, line in enumerate(lines) if "Zimbabwe" in line), None)
    if start is None or len(lines) - start < 52:
        return False
    listed = [_ascii(line) for line in lines[start:]]
    return listed == sorted(listed, reverse=True)


def _words_reversed(t):
    forward = " ".join(t.lower().strip().translate(NO_PUNCT).split()[::-1])
    return "bald eagle" in forward and forward in sentences(forward)


def _sentence_alphabet(t):
    said = sentences(t)
    return len(said) == 26 and all(s.split() and s.split()[0][0].lower() == chr(97 + i) for i, s in enumerate(said))


def _capitals(t):
    listed = [c for c in _ascii(t).split(",") if c.strip()]
    return [c.strip() for c in listed] == EUROPEAN_CAPITALS_BY_LATITUDE


def _csv_city(t):
    rows = list(csv.reader(io.StringIO(t)))
    return len(rows) == 8 and rows[0] == ["ID", "Country", "City", "Year", "Count"] and all(len(r) == 5 for r in rows[1:])


def _header(columns, sep):
    return "^" + sep.join(f'({c}|"{c}")' for c in columns) + "$"


def _csv_special(t):
    columns = ["ProductID", "Category", "Brand", "Price", "Stock"]
    if not re.match(_header(columns, r",[ \t]*"), t.split("\n")[0].strip()):
        return False
    rows = list(csv.reader(io.StringIO(t.replace('"', '"""'))))  # IFBench's way of keeping the quotes
    if len(rows) != 15:
        return False
    for row in rows[1:]:
        if len(row) != 5:
            return False
        if any(re.match(r'".*[^\d\w\s].*"', field) for field in row):
            return True
    return False


def _csv_quotes(t):
    columns = ["StudentID", "Subject", "Grade", "Semester", "Score"]
    if not re.match(_header(columns, r"\t *"), t.split("\n")[0].strip()):
        return False
    rows = list(csv.reader(io.StringIO(t.replace('"', '"""')), delimiter="\t"))
    return len(rows) == 4 and all(len(r) == 5 and all(f.strip()[:1] == '"' and f.strip()[-1:] == '"' for f in r)
                                  for r in rows)


def _napoleon_dates(t):
    longest = {1: 31, 3: 31, 5: 31, 7: 31, 8: 31, 10: 31, 12: 31, 4: 30, 6: 30, 9: 30, 11: 30, 2: 29}
    for date in t.strip().split(","):
        if not re.match(r"^\d{4}-\d{2}-\d{2}$", date.strip()):
            return False
        year, month, day = map(int, date.strip().split("-"))
        if not 1769 <= year <= 1821 or month > 12 or day > longest.get(month, 99):
            return False  # Napoleon's lifetime; IFBench lets month 00 and day 00 through
    return True


CHECKS = {
    "custom:multiples": lambda t: re.findall(r"\d+", t.replace(",", ", ")) == [str(i) for i in range(14, 51, 7)],
    "custom:mcq_count_length": _mcq,
    "custom:reverse_newline": _africa_reversed,
    "custom:word_reverse": _words_reversed,
    "custom:character_reverse": lambda t: "elgae dlab" in t.lower(),
    "custom:sentence_alphabet": _sentence_alphabet,
    "custom:european_capitals_sort": _capitals,
    "custom:csv_city": _csv_city,
    "custom:csv_special_character": _csv_special,
    "custom:csv_quotes": _csv_quotes,
    "custom:date_format_list": _napoleon_dates,
}
