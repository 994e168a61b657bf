"""progress_bar.py: a tqdm bar on a terminal, plain interval lines (tqdm's counts and rates) in a log."""

import io
import re

from kit.progress_bar import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_gets_interval_lines_and_a_last_line(monkeypatch):
    log = io.StringIO()  # not a terminal: no bar, no carriage returns
    monkeypatch.setattr("sys.stdout", log)
    assert list(progress(["a", "b", "c"], desc="[t] read", unit="doc", every_s=0.0)) == ["a", "b", "c"]
    lines = log.getvalue().splitlines()
    assert [ln.split(" [")[0] for ln in lines] == ["[t] read: 1/3 doc", "[t] read: 2/3 doc", "[t] read: 3/3 doc",
                                                   "[t] read: 3/3 doc"]
    assert all(re.search(r"doc/s\]$", ln) for ln in lines) and "\r" not in log.getvalue()

    log.truncate(0), log.seek(0)
    with progress(desc="[t] hash", unit="B", scale=True, every_s=3600, quiet_below_s=0.0) as bar:  # the last line only
        for _ in range(3):
            bar.update(2_500_000)
    assert re.fullmatch(r"\[t\] hash: 7\.50MB \[00:00, [\d.]+[kMGTP]?B/s\]\n", log.getvalue()), log.getvalue()

    log.truncate(0), log.seek(0)
    with progress(desc="[t] hash", unit="B", scale=True, every_s=3600) as bar:  # quick work: no line at all
        bar.update(2_500_000)
    assert log.getvalue() == ""


def test_terminal_gets_a_tqdm_bar(monkeypatch):
    term = Terminal()
    monkeypatch.setattr("sys.stdout", term)
    for _ in progress(range(4), desc="[t] eval", unit="ckpt"):
        pass
    out = term.getvalue()
    assert "\r" in out and "100%" in out and "4/4" in out and "ckpt/s" in out
