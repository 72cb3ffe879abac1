"""engine.fileio: atomic writes get a plain open()'s mode (0o666 minus the umask), not mkstemp's 0600."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from engine.checkpoint import save_checkpoint
from engine.fileio import atomic_write, atomic_write_text, current_umask


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it after."""
    old = os.umask(0o022)
    os.umask(old)

    def _set(mask: int) -> None:
        os.umask(mask)

    yield _set
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_follow_the_umask(tmp_path: Path, umask, mask: int, expected: int) -> None:
    umask(mask)
    assert current_umask() == mask
    text = atomic_write_text(tmp_path / "list.txt", "a 1 0\n")
    binary = atomic_write(tmp_path / "scores.bin", lambda f: f.write(b"\0"))
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", {"model": {"w": torch.zeros(1)}})
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what a plain open() gives: the reference
    assert mode(plain) == expected
    assert [mode(text), mode(binary), mode(ckpt)] == [expected] * 3
    assert text.read_text() == "a 1 0\n"
    assert not list(tmp_path.glob(".*tmp"))


def test_replacing_a_file_keeps_the_umask_mode(tmp_path: Path, umask) -> None:
    umask(0o022)
    path = tmp_path / "classes.txt"
    path.write_text("old\n")
    path.chmod(0o600)
    atomic_write_text(path, "new\n")
    assert mode(path) == 0o644 and path.read_text() == "new\n"
