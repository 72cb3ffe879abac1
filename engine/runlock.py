"""One writer per run directory: `RUN_DIR/train.lock`, held by rank 0 for the whole run.

Two trainers in one out_dir would overwrite each other's checkpoints and interleave metrics.jsonl
without a word, so the second one stops before it writes anything and names the first. The lock is
`fcntl.flock` on an open file: the kernel drops it when the holder exits in any way (SIGKILL and the OOM
killer included), so a crashed run never blocks the next one. The file's text (pid, host, start time,
command) is only for the messages: a released lock leaves the file empty; a file with text whose lock
is free was left by a run that died, and the next start says it took it over. Where the filesystem has
no flock (some parallel filesystems), the text decides: a live pid on this host, or any other host,
holds the directory; a dead pid on this host is taken over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from engine.preflight import PreflightError

LOCK_NAME = "train.lock"


class RunDirBusyError(PreflightError):
    """Another trainer holds the run directory; the message names it (pid, host, start, command)."""


def _holder_text() -> str:
    return json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(), "command": " ".join([sys.executable, *sys.argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })  # fmt: skip


def _describe(holder: dict) -> str:
    if not holder:
        return "another process (it has not written its pid yet)"
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
        f"{holder.get('started', '?')}, command: {holder.get('command', '?')}"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """Context manager: `with RunLock(out_dir, say):` holds out_dir's lock (or raises RunDirBusyError)."""

    def __init__(self, out_dir: str | Path, say: Callable[[str], None] = print, key: str = "train.out_dir"):
        self.path = Path(out_dir) / LOCK_NAME
        self.say, self.key = say, key
        self.fd = -1

    def __enter__(self) -> RunLock:
        if self.fd < 0:  # (already held when acquired before the `with`)
            self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            locked = self._flock(fd)  # False: no flock on this filesystem, the text decides
            self._take_over_if_stale(self._read(fd), lock_free=locked)
            os.ftruncate(fd, 0)
            os.pwrite(fd, (_holder_text() + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def release(self) -> None:
        """Empty the file (a clean end), then drop the lock: LOCK_UN, not just close, because forked
        loader workers share the open file and would hold it until they exit."""
        if self.fd < 0:
            return
        try:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1

    def _flock(self, fd: int) -> bool:
        """True: locked. False: the filesystem has no flock. Raises RunDirBusyError when it is held."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            raise self._busy(self._read(fd)) from None
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return False
            raise

    def _take_over_if_stale(self, holder: dict, lock_free: bool) -> None:
        """`holder`: the text a previous run left. Free lock (or a dead pid on this host): say so."""
        if not holder:
            return
        pid, host = holder.get("pid"), holder.get("host")
        here = host == socket.gethostname()
        if not lock_free and not (here and isinstance(pid, int) and not _pid_alive(pid)):
            raise self._busy(holder)
        why = "not running" if here else f"its lock is free (host {host})"
        self.say(f"took over the stale lock {self.path} of {_describe(holder)} ({why})")

    def _busy(self, holder: dict) -> RunDirBusyError:
        return RunDirBusyError(
            f"{self.key}: {self.path.parent} is in use by another trainer ({_describe(holder)}); wait for it "
            f"to end or set {self.key} to another directory (lock file {self.path})"
        )

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            text = os.pread(fd, 1 << 16, 0).decode("utf-8", "replace").strip()
            holder = json.loads(text) if text else {}
        except (OSError, ValueError):
            return {"command": "unreadable lock file"}
        return holder if isinstance(holder, dict) else {}
