"""Output for logs: plain progress lines (what a rich bar shows, one line every ~10 s), and a rich
console that does not cut tables at 80 columns when writing to a file.

A bar redraws in place and leaves nothing readable in a log file (or nothing at all: rich draws no bar
when output is not a terminal), so long jobs whose output goes to a file or a pipe print these lines
instead: `label: 120/400 videos (30%)  8.1 videos/s  elapsed 0:15  eta 0:35`.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from rich.console import Console

# rich sizes a console that is not a terminal at 80 columns and cuts tables to fit; log files get this.
LOG_WIDTH = 200


def log_console(**kwargs) -> Console:
    """A rich Console: the terminal's width on a terminal, LOG_WIDTH columns in a file or a pipe."""
    from rich.console import Console

    console = Console(**kwargs)
    if not console.is_terminal and "width" not in kwargs:
        console = Console(width=LOG_WIDTH, **kwargs)
    return console


def clock(seconds: float) -> str:
    """0:15, 12:03, 1:02:03."""
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressLines:
    """`update(done)`: a line once `every_s` passed since the last one, and always at `done == total`."""

    def __init__(
        self, label: str, total: int, unit: str = "items", every_s: float = 10.0, stream: TextIO | None = None
    ) -> None:
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.stream = stream
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, done: int) -> None:
        self.done = done
        now = time.perf_counter()
        if done >= self.total or now - self.last >= self.every_s:
            self.last = now
            print(self.line(now), file=self.stream or sys.stdout, flush=True)

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.perf_counter()) - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = f"  eta {clock((self.total - self.done) / rate)}" if 0 < rate and self.done < self.total else ""
        return (
            f"{self.label}: {self.done}/{self.total} {self.unit}{pct}  {rate:.1f} {self.unit}/s  "
            f"elapsed {clock(elapsed)}{eta}"
        )
