"""Small helpers shared by the prep tools: user errors, atomic writes, a parallel map with a progress bar.

Every prep CLI turns a `UserError` into one `error: ...` line and exit status 2 (no traceback), so a
user sees which file / line / option is wrong and why.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from engine.fileio import atomic_write_text  # noqa: F401  (re-exported for the prep tools)
from engine.lifetime import pool_options
from engine.progress import ProgressLines

T = TypeVar("T")
R = TypeVar("R")

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".3gp", ".ogv",
                    ".wmv", ".ts")  # fmt: skip
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Raw elementary streams (no container, no timestamps): no loader reads them; prep.resize re-encodes them
# (with --fps N, the rate they were recorded at) and prep.validate flags them whatever their name.
RAW_EXTENSIONS = (".h264", ".264", ".avc", ".h265", ".265", ".hevc")


class UserError(Exception):
    """A problem with the user's input or options; printed as `error: <message>` with exit status 2."""


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Run a CLI entry point: user errors become one line on stderr and exit 2; Ctrl-C exits 130."""
    try:
        code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted: finished outputs are kept; run the same command again to resume", file=sys.stderr)
        code = 130
    sys.exit(code)


def refuse_links_and_sources(path: Path, top: Path, sources: Path | None = None, tool: str = "prep") -> None:
    """Refuse (UserError) an output `path` under the folder `top` that passes through a symbolic link
    (any component from `top` down, the file itself included) or resolves into `sources`.

    Why: a link left in the output tree (`DST/sub -> SRC/sub`, `DST/.a.mp4.part -> SRC/a.mp4`) would
    make a writer replace or create files among the user's sources, which no prep tool may touch.
    """
    cur = top
    for part in path.relative_to(top).parts:
        cur = cur / part
        if cur.is_symlink():
            raise UserError(f"{cur} is a symbolic link (to {os.readlink(cur)}): {tool} writes only real "
                            "files and folders under its output folder, never through a link: remove it")
    if sources is not None:
        resolved, src = path.resolve(), sources.resolve()
        if resolved == src or src in resolved.parents:
            raise UserError(f"{path} resolves to {resolved}, inside the sources {sources}: {tool} never "
                            "writes there")


def create_exclusive(path: Path) -> int:
    """A new empty file opened for writing: O_EXCL and O_NOFOLLOW, so neither a leftover file nor a
    link planted under the name is ever written through. Returns the descriptor."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)


def default_jobs() -> int:
    """Worker count when --jobs is not given: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def positive_int(text: str) -> int:
    """argparse type for --jobs and friends: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        import argparse

        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def parallel_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    jobs: int,
    description: str,
    threads: bool = False,
    quiet: bool = False,
    unit: str = "files",
) -> Iterator[tuple[T, R]]:
    """Yield (item, fn(item)) as results arrive (any order), with a rich progress bar and ETA on a
    terminal, and plain progress lines every ~10 s (engine.progress) when stdout is a file or a pipe.

    `threads=True` for work that runs in subprocesses (ffmpeg); processes for Python/PyAV work.
    `fn` must be a module-level function when processes are used. With jobs == 1 it runs inline,
    which keeps tracebacks simple and tests fast.
    """
    todo = list(items)
    if quiet or not todo or sys.stdout.isatty():
        yield from _parallel_map(fn, todo, jobs, description, threads, quiet)
        return
    lines = ProgressLines(description, len(todo), unit)
    for done, pair in enumerate(_parallel_map(fn, todo, jobs, description, threads, quiet=True), start=1):
        lines.update(done)
        yield pair


def _parallel_map(
    fn: Callable[[T], R], todo: list[T], jobs: int, description: str, threads: bool, quiet: bool
) -> Iterator[tuple[T, R]]:
    """parallel_map with the rich bar (or nothing, when quiet)."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False, disable=quiet or not todo) as progress:
        task = progress.add_task(description, total=len(todo))
        if jobs <= 1 or len(todo) <= 1:
            for item in todo:
                result = fn(item)
                progress.advance(task)
                yield item, result
            return
        pool: Executor = ThreadPoolExecutor(jobs) if threads else ProcessPoolExecutor(jobs, **pool_options())
        try:
            futures = {pool.submit(fn, item): item for item in todo}
            for future in as_completed(futures):
                progress.advance(task)
                yield futures[future], future.result()
        finally:
            # On Ctrl-C (or an exception in the caller) drop the queued work instead of finishing it.
            pool.shutdown(wait=True, cancel_futures=True)


def write_packet_index(list_path: Path, video_paths: list[str], jobs: int, quiet: bool = False) -> Path:
    """LIST.index for the videos of a list: demuxed in parallel, only entries missing or stale.

    The loader memory-maps it in every worker (dali_pipes.packet_index); unreadable files are left
    out (the list report / LIST.bad names them).
    """
    from dali_pipes.packet_index import PacketIndex, index_job, index_path_for

    index = PacketIndex(index_path_for(list_path))
    todo = dict(index.missing([p for p in video_paths if os.path.isfile(p)]))
    for path, result in parallel_map(index_job, list(todo), jobs, "packet index", quiet=quiet):
        if not isinstance(result, str):
            index.add(path, todo[path], result)
    index.save()
    return index.path
