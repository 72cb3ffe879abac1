"""List files (`relative/path num_frames label`, one sample per line) and flip-pair files.

Every problem is reported as `file:line: why`, so a user can open the file at the bad line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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

    @property
    def where(self) -> str:
        return f"{self.list_file}:{self.line}"


def read_list(list_path: str | Path, root: str | Path = "") -> list[Entry]:
    """Parse a list; paths are joined to `root` (default: the list file's directory).

    Blank lines and lines starting with '#' are skipped; the sample id is the index in the returned list.
    """
    list_path = Path(list_path)
    if not list_path.is_file():
        raise ListFileError(f"{list_path}: list file not found")
    base = Path(root) if root else list_path.parent
    entries: list[Entry] = []
    for lineno, raw in enumerate(list_path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=2)
        where = f"{list_path}:{lineno}"
        if len(parts) != 3:
            raise ListFileError(f"{where}: expected 'path num_frames label', got {raw!r}")
        rel, frames, label = parts
        try:
            num_frames, lab = int(frames), int(label)
        except ValueError:
            raise ListFileError(f"{where}: num_frames and label must be integers, got {raw!r}") from None
        if num_frames < 1:
            raise ListFileError(f"{where}: num_frames must be >= 1, got {num_frames}")
        if lab < 0:
            raise ListFileError(f"{where}: label must be >= 0, got {lab}")
        entries.append(Entry(str(base / rel), num_frames, lab, lineno, str(list_path)))
    if not entries:
        raise ListFileError(f"{list_path}: the list has no samples")
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
