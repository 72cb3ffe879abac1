"""List files (`relative/path num_frames label`, one sample per line) and flip-pairs files.

Every problem is reported as `file:line: why`, so a user can open the file at the bad line.
This is the one parser for lists: the loader (`read_list`, which refuses a list with any bad line)
and prep.validate (`parse_list`, which reports every bad line and keeps the good ones) share its rules:

- UTF-8 text; a byte-order mark at the start is ignored, CRLF line endings are accepted.
- Blank lines and comment lines (first non-blank character `#`) are skipped; they still count in
  line numbers. A `#` later in a line is part of the path.
- The last two whitespace-separated fields are num_frames (1 .. 2**31 - 1) and label (>= 0, below the
  class count when one is known), plain ASCII digits; everything before them is the path, which may hold
  spaces (not a NUL byte). A line whose path ends in a separate number field (`a.webm 10 0 3`) has too
  many fields.
- Each file once: a path listed again (after joining to the root; a symbolic or hard link to a listed
  file is the same file) is a duplicate line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MALFORMED = "malformed line"
# num_frames and label above this are typos (2**31 - 1 frames: two years at 30 fps); bounding them keeps
# the sampler's and DALI's int32/int64 arithmetic from overflowing into a traceback
MAX_COUNT = 2**31 - 1
DUPLICATE = "duplicate line"


class ListFileError(ValueError):
    """A malformed list / flip-pairs file; the message starts with file:line."""


@dataclass(frozen=True)
class Entry:
    """One sample. `line` is the 1-based line number in the list (for error messages)."""

    path: str  # absolute path of the video file or frame folder
    num_frames: int
    label: int
    line: int
    list_file: str
    rel: str = ""  # the path as written in the list
    text: str = ""  # the whole line as written (no line ending)

    @property
    def where(self) -> str:
        return f"{self.list_file}:{self.line}"


@dataclass(frozen=True)
class LineProblem:
    """A list line that is not a usable sample: `kind` is MALFORMED or DUPLICATE."""

    list_file: str
    line: int
    kind: str
    reason: str

    @property
    def where(self) -> str:
        return f"{self.list_file}:{self.line}"

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


def _is_count(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _parse_line(text: str, num_classes: int | None) -> tuple[str, int, int] | str:
    """(path, num_frames, label), or why the line is malformed."""
    fields = text.split()
    shown = text if len(text) <= 80 else text[:77] + "..."
    if len(fields) < 3:
        return f"expected 'path num_frames label' (3 fields), got {len(fields)}: {shown!r}"
    if len(fields) > 3 and _is_count(fields[-3]):
        return f"too many fields: expected 'path num_frames label', got {shown!r}"
    rel, frames, label = text.rsplit(maxsplit=2)
    if not (_is_count(frames) and _is_count(label)):
        return f"num_frames and label must be integers >= 0, got {shown!r}"
    if int(frames) < 1:
        return f"num_frames must be >= 1, got {frames}"
    if int(frames) > MAX_COUNT or int(label) > MAX_COUNT:
        return f"num_frames and label must be at most {MAX_COUNT}, got {shown!r}"
    if "\0" in rel:
        return f"the path holds a NUL byte, which no file name can: {rel!r}"
    if num_classes is not None and int(label) >= num_classes:
        return f"label {label} is out of range: there are {num_classes} classes (0..{num_classes - 1})"
    return rel, int(frames), int(label)


def file_identity(path: str) -> object:
    """What makes two list paths one file: (device, inode) when it exists, so a symbolic or hard link to a
    listed file is a duplicate (one stat, cheaper than resolving every component); else the normalised
    path (a missing file listed twice is still a duplicate)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # missing, unreadable, or a NUL byte
        return os.path.normpath(path)
    return st.st_dev, st.st_ino


def format_line(rel: str, num_frames: int, label: int) -> str:
    """The list line for one sample; ValueError (why) when this parser would not read the same path back
    (a path ending in ` <number>` such as a folder "take 2", blanks at either end, a line break, a
    leading `#`): a list tool must never write a line its own loader refuses."""
    line = f"{rel} {num_frames} {label}"
    parsed = _parse_line(line, None) if "\n" not in line and "\r" not in line else "it holds a line break"
    if isinstance(parsed, str) or rel.startswith("#") or parsed[0] != rel:
        why = parsed if isinstance(parsed, str) else "blanks at its ends or a leading '#' would be lost"
        raise ValueError(f"the list line for {rel!r} would not read back ({why}): rename it")
    return line


def parse_list(
    list_path: str | Path, root: str | Path = "", num_classes: int | None = None
) -> tuple[list[Entry], list[LineProblem]]:
    """Every good sample line and every bad line with its reason (see the module rules).

    Paths are joined to `root` (default: the list file's directory); the sample id of an entry is its
    index in the returned list.
    """
    list_path = Path(list_path)
    if not list_path.is_file():
        raise ListFileError(f"{list_path}: list file not found")
    base = Path(root) if root else list_path.parent
    data = list_path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    entries: list[Entry] = []
    problems: list[LineProblem] = []
    seen: dict[object, tuple[int, str]] = {}  # file identity -> (line, path as joined)
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            problems.append(LineProblem(str(list_path), lineno, MALFORMED, f"not UTF-8 text ({e.reason})"))
            continue
        line = text.strip()
        if not line or line.startswith("#"):
            continue
        parsed = _parse_line(line, num_classes)
        if isinstance(parsed, str):
            problems.append(LineProblem(str(list_path), lineno, MALFORMED, parsed))
            continue
        rel, num_frames, label = parsed
        path = str(base / rel)
        key = file_identity(path)
        if key in seen:
            first, first_path = seen[key]
            if os.path.normpath(first_path) == os.path.normpath(path):
                why = f"{rel} is already listed on line {first} (each sample once)"
            else:
                why = f"{rel} is the same file as line {first} ({first_path}) through a link"
            problems.append(LineProblem(str(list_path), lineno, DUPLICATE, why))
            continue
        seen[key] = (lineno, path)
        entries.append(Entry(path, num_frames, label, lineno, str(list_path), rel, line))
    return entries, problems


def read_list(list_path: str | Path, root: str | Path = "", num_classes: int | None = None) -> list[Entry]:
    """The samples of a list; any bad line (or no sample at all) is a ListFileError naming file:line."""
    entries, problems = parse_list(list_path, root, num_classes)
    if problems:
        more = f" (and {len(problems) - 1} more bad lines)" if len(problems) > 1 else ""
        raise ListFileError(f"{problems[0]}{more}; `python -m prep.validate {list_path}` writes a clean list")
    if not entries:
        raise ListFileError(f"{list_path}: the list has no samples (empty, or only blank and comment lines)")
    return entries


def read_flip_pairs(path: str | Path) -> dict[int, int]:
    """`a b` lines -> a symmetric label map {a: b, b: a} used when a clip is flipped."""
    path = Path(path)
    if not path.is_file():
        raise ListFileError(f"{path}: flip pairs file not found (data.flip_pairs)")
    pairs: dict[int, int] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            a, b = (int(x) for x in parts)
        except ValueError:
            raise ListFileError(f"{path}:{lineno}: expected two integer labels 'a b', got {raw!r}") from None
        for x, y in ((a, b), (b, a)):
            if pairs.get(x, y) != y:
                raise ListFileError(f"{path}:{lineno}: label {x} is already paired with {pairs[x]}")
            pairs[x] = y
    return pairs
