"""Atomic file writes, the one implementation every output of the project goes through.

A temp file in the target's folder, flushed and fsynced, then `os.replace`: readers (and a crash
mid-write) never see a half-written file, and an existing good file is only ever replaced whole.
The result gets the mode a plain `open()` would give (0o666 minus the umask, 0644 under umask 022),
not mkstemp's private 0600, so teammates on a shared cluster can read lists and checkpoints.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only swap it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: swap and restore (a brief window other threads could see)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO], None], binary: bool = True) -> Path:
    """Call `write(f)` on a temp file next to `path`, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    text_args = {} if binary else {"encoding": "utf-8", "newline": ""}
    try:
        with os.fdopen(fd, "wb" if binary else "w", **text_args) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), binary=False)
