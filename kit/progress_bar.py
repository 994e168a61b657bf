"""One progress display for long non-training work: curation, tokenizer input streaming, the merge,
the evaluation.

    for doc in progress(docs, desc="[curate] read web", unit="doc"): ...
    with progress(total=n_bytes, desc="[merge] hash", unit="B", scale=True) as bar: bar.update(k)

On a terminal it is a tqdm bar with counts and rates. When stdout is not a terminal (Slurm logs,
CI, pytest) there is no bar: one plain line every LOG_EVERY_S seconds and a last one at the end,
in tqdm's own count/rate format, so a day-long job leaves a readable log; work done in under
QUIET_BELOW_S seconds leaves no line (a stage prints its own summary of it).
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator

from tqdm import tqdm

LOG_EVERY_S = 30.0  # seconds between lines in a non-terminal log (a bar redraws continuously instead)
QUIET_BELOW_S = 5.0  # a non-terminal log skips the last line of work this short: one line per hash/read is noise
_LINE = "{desc}: {n_fmt}/{total_fmt}%s{unit} [{elapsed}<{remaining}, {rate_fmt}]"
_LINE_NO_TOTAL = "{desc}: {n_fmt}%s{unit} [{elapsed}, {rate_fmt}]"


class Progress:
    def __init__(self, total: float | None = None, desc: str = "", unit: str = "it", scale: bool = False,
                 every_s: float = LOG_EVERY_S, stream=None, quiet_below_s: float = QUIET_BELOW_S):
        self.stream = stream or sys.stdout
        self.total, self.desc, self.unit, self.scale, self.every_s = total, desc, unit, scale, every_s
        self.quiet_below_s, self.lines = quiet_below_s, 0
        self.n, self.t0, self.closed = 0, time.perf_counter(), False
        self.t_line = self.t0
        self.bar = (tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, file=self.stream, dynamic_ncols=True)
                    if self.stream.isatty() else None)

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.t_line >= self.every_s:
            self.t_line = now
            self.lines += 1
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        """The plain-log line for the progress so far."""
        fmt = (_LINE if self.total else _LINE_NO_TOTAL) % ("" if self.scale else " ")  # 9.00MB, 5/9 docs
        total = max(self.total, self.n) if self.total else None  # a budget the stream overshot is done
        return tqdm.format_meter(self.n, total, time.perf_counter() - self.t0, prefix=self.desc,
                                 unit=self.unit, unit_scale=self.scale, bar_format=fmt)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.lines or time.perf_counter() - self.t0 >= self.quiet_below_s:  # the last line: done, how fast
            print(self.line(), file=self.stream, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
             scale: bool = False, every_s: float = LOG_EVERY_S,
             quiet_below_s: float = QUIET_BELOW_S) -> Iterator | Progress:
    """Wrap an iterable (one update per item) or, without one, return a Progress to update by hand."""
    if iterable is None:
        return Progress(total, desc, unit, scale, every_s, quiet_below_s=quiet_below_s)
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return _iterate(iterable, Progress(total, desc, unit, scale, every_s, quiet_below_s=quiet_below_s))


def _iterate(iterable: Iterable, bar: Progress) -> Iterator:
    with bar:
        for item in iterable:
            yield item
            bar.update()
