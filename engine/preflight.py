"""Checks that run before any heavy work (loaders, model, process-group traffic), so a typo or a bad run
directory costs a second, not a GPU-hour: labels within the model's classes, a writable output folder,
and the removal of temp files that interrupted checkpoint writes left behind."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol


class PreflightError(ValueError):
    """A problem found before training started; the message names the file, line or config key."""


class LabelledEntry(Protocol):
    label: int

    @property
    def where(self) -> str: ...  # "list_file:line"


# The temp names engine.fileio.atomic_write gives checkpoints: ".{name}.{random}.tmp" (mkstemp), and
# engine.checkpoint.mark_best's ".ckpt_best.pt.{random}.tmp"
STALE_CKPT_TMP = re.compile(r"^\.ckpt_(e\d+_s\d+|best)\.pt\.[^/]+\.tmp$")


def check_labels(entries: Iterable[LabelledEntry], num_classes: int, key: str = "model.num_classes") -> None:
    """Every label in [0, num_classes): the first that is not names its list line (an index error deep
    inside the loss after minutes of setup is the alternative)."""
    for e in entries:
        if not 0 <= e.label < num_classes:
            raise PreflightError(
                f"{e.where}: label {e.label} is outside [0, {num_classes}) ({key} is {num_classes})"
            )


def check_writable_dir(path: str | Path, key: str = "train.out_dir") -> Path:
    """Create `path` if needed and prove a file can be written there (a file in its place, a read-only
    folder or a missing permission fails here, in one line, instead of at the first checkpoint)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PreflightError(f"{key}: {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PreflightError(f"{key}: cannot write to {path}: {e.strerror or e}") from None
    return path


def remove_stale_checkpoint_temps(out_dir: str | Path) -> list[Path]:
    """Delete temp files of checkpoint writes that a crash or kill interrupted (ours only, by name)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    stale = [p for p in out_dir.iterdir() if STALE_CKPT_TMP.match(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
