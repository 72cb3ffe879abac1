"""prep.common.parallel_map: progress lines when stdout is not a terminal (logs, pipes), none when quiet."""

from __future__ import annotations

import pytest

from engine import progress
from prep.common import parallel_map


def double(x: int) -> int:
    return 2 * x


@pytest.mark.parametrize("jobs", [1, 2])
def test_progress_lines_when_stdout_is_not_a_tty(capsys, monkeypatch, jobs):
    ticks = iter(range(0, 1000, 6))  # each clock read advances 6 s: a line every other item
    monkeypatch.setattr(progress.time, "perf_counter", lambda: float(next(ticks)))
    results = dict(parallel_map(double, [1, 2, 3, 4, 5], jobs, "double", threads=True))
    assert results == {1: 2, 2: 4, 3: 6, 4: 8, 5: 10}
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("double: 5/5 files (100%)")
    assert 2 <= len(lines) <= 4 and all(line.startswith("double: ") for line in lines)
    assert "eta" in lines[0]


def test_quiet_prints_nothing(capsys):
    assert dict(parallel_map(double, [1, 2], 1, "double", quiet=True)) == {1: 2, 2: 4}
    assert capsys.readouterr().out == ""
