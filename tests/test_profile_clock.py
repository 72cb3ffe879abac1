"""The profiler's CPU clock: nanosecond process clocks, and no ratio it cannot stand behind."""

from __future__ import annotations

import subprocess
import sys
import time

from rich.console import Console

from dali_pipes.profile import TOO_LITTLE_CPU, Result, process_cpu_ns, render, settle, tree_cpu_seconds


def test_process_clock_counts_a_child_below_one_tick():
    """A child that burns ~3 ms of CPU (under /proc's 10 ms tick) reads > 0 and < 1 s; a gone pid is None."""
    code = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.003: pass\ninput()"
    child = subprocess.Popen([sys.executable, "-S", "-c", code], stdin=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while (process_cpu_ns(child.pid) or 0) < 3_000_000 and time.monotonic() < deadline:
            time.sleep(0.01)
        ns = process_cpu_ns(child.pid)
        assert ns is not None and 3_000_000 <= ns < 1_000_000_000
        assert ns % 10_000_000 != 0  # not a multiple of the 10 ms tick (a tick count would be)
    finally:
        child.communicate("\n", timeout=60)
    assert process_cpu_ns(child.pid) is None


def test_own_tree_clock_is_monotonic_and_fine():
    a = tree_cpu_seconds()
    sum(i * i for i in range(20000))  # ~1 ms of CPU
    b = tree_cpu_seconds()
    assert 0 < b - a < 1.0


def test_render_never_divides_by_zero_and_says_why():
    """Routes with 0 ms CPU (what 10 ms ticks gave on a short run) get '-' and one explaining line."""
    rows = [Result("route", "route", clips=4, seconds=0.5, cpu_seconds=0.0),
            Result("DataLoader + pyav-seek", "baseline", clips=4, seconds=0.5, cpu_seconds=0.0),
            Result("DataLoader + pyav-seq", "baseline", clips=4, seconds=0.5, cpu_seconds=0.001)]  # fmt: skip
    console = Console(width=300, record=True)
    render(rows, "t", console)
    text = console.export_text()
    assert TOO_LITTLE_CPU in text
    assert "1.00x" in text  # clips/s ratios still print
    assert "0.00x" not in text and "inf" not in text


def test_render_prints_ratios_when_enough_was_measured():
    rows = [Result("route", "route", clips=10, seconds=1.0, cpu_seconds=0.5),
            Result("DataLoader + pyav-seek", "baseline", clips=10, seconds=1.0, cpu_seconds=1.0)]  # fmt: skip
    console = Console(width=300, record=True)
    render(rows, "t", console)
    text = console.export_text()
    assert "0.50x" in text and TOO_LITTLE_CPU not in text


def _burner(seconds: float) -> subprocess.Popen:
    """A child that burns `seconds` of CPU (forever if < 0), then waits for a line on stdin."""
    code = ("import time\nt = time.process_time()\n"
            f"while {seconds} < 0 or time.process_time() - t < {seconds}: pass\ninput()")  # fmt: skip
    return subprocess.Popen([sys.executable, "-S", "-c", code], stdin=subprocess.PIPE, text=True)


def test_settle_waits_for_the_producers_to_go_idle():
    """settle() returns only once the tree stops using CPU, with all the work done before that counted
    (what makes the profiler's window hold exactly the timed batches' work, prefetched or not)."""
    child = _burner(0.3)
    try:
        start = time.perf_counter()
        cpu, idle_at, settled = settle({child.pid}, timeout=60)
        assert settled and cpu >= 0.3 and idle_at - start >= 0.25
        again, _, settled_again = settle({child.pid}, timeout=60)  # already idle: returns at once
        assert settled_again and again - cpu < 0.01
    finally:
        child.communicate("\n", timeout=60)


def test_settle_gives_up_on_a_tree_that_never_idles():
    child = _burner(-1)
    try:
        start = time.perf_counter()
        _, _, settled = settle({child.pid}, timeout=0.3)
        assert not settled and time.perf_counter() - start < 5
    finally:
        child.kill()
        child.wait(timeout=60)
