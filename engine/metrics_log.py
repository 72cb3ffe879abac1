"""What a run leaves behind besides checkpoints: its provenance (code, library and device versions) and
metrics.jsonl (one JSON record per line; TensorBoard too when it is installed: `pip install -e .[tb]`,
and a run without it says so once). Rank 0 only."""

from __future__ import annotations

import errno
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from engine.distributed import DistInfo
from engine.fileio import atomic_write_text

log = logging.getLogger(__name__)
TB_OFF = "TensorBoard is off (not installed): `pip install -e .[tb]` to log there too (metrics.jsonl has all)"


def provenance(info: DistInfo) -> dict:
    """Where a run came from: code version, library versions and devices."""
    repo = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
            return out.stdout.strip() if out.returncode == 0 else ""
        except (OSError, subprocess.SubprocessError):
            return ""

    try:
        import nvidia.dali as dali

        dali_version = dali.__version__
    except ImportError:
        dali_version = "not installed"
    if info.device.type == "cuda":
        devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        devices = [f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"]
    return {
        "git_sha": git("rev-parse", "HEAD") or "unknown",
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "dali": dali_version,
        "cuda": torch.version.cuda or "none",
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
        "devices": devices,
        "world_size": info.world_size,
        "host": socket.gethostname(),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


_tb_off_said = False


def _say_tb_off_once() -> None:
    """One warning per process, not one per run folder (demo.py and tests start several runs)."""
    global _tb_off_said
    if not _tb_off_said:
        _tb_off_said = True
        log.warning(TB_OFF)


class MetricsLogError(RuntimeError):
    """metrics.jsonl cannot be written (a full disk); the message names the file and what is kept."""


class MetricsLog:
    """metrics.jsonl (one JSON object per line, written whole) and TensorBoard when it is installed.

    Each record goes to the file in one unbuffered write; a write that fails (ENOSPC) is cut back off,
    so the file never ends in half a record, and stops the run with one line. A file that does end in
    half a record (a power loss; a full disk under older versions) is repaired when it is opened: the
    next start's records never run on from it."""

    def __init__(self, out_dir: Path, resume_step: int | None) -> None:
        self.path = out_dir / "metrics.jsonl"
        try:
            if resume_step is not None and self.path.exists():
                self._truncate_after(resume_step)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o666)
            torn = self._drop_torn_tail()
        except OSError as e:
            raise self._error(e, "not opened") from None
        if torn:
            print(f"{self.path}: removed a torn last line ({torn} bytes; a run was stopped while writing it)",
                  file=sys.stderr)  # fmt: skip
        self.size = os.fstat(self.fd).st_size
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"))
        except ImportError:
            self.tb = None
            _say_tb_off_once()

    def _truncate_after(self, step: int) -> None:
        """A resumed run redoes the steps after its checkpoint: drop their old records (atomically)."""
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if rec.get("step", 0) <= step:
                keep.append(line)
        atomic_write_text(self.path, "".join(f"{line}\n" for line in keep))

    def _drop_torn_tail(self) -> int:
        """Cut the file after its last newline; returns the bytes removed (0: it ended whole)."""
        size = os.fstat(self.fd).st_size
        with open(self.path, "rb") as f:
            end = size
            while end > 0:
                start = max(0, end - (1 << 16))
                f.seek(start)
                chunk = f.read(end - start)
                nl = chunk.rfind(b"\n")
                if nl >= 0:
                    keep = start + nl + 1
                    break
                end = start
            else:
                keep = 0
        if keep < size:
            os.ftruncate(self.fd, keep)
        return size - keep

    def write(self, kind: str, step: int, **values: Any) -> None:
        data = (json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n").encode()
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as e:
            try:
                os.ftruncate(self.fd, self.size)  # the records before this one stay whole
            except OSError:
                pass
            raise self._error(e, f"the {kind} record of step {step} is not written") from None
        self.size += len(data)
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def _error(self, e: OSError, what: str) -> MetricsLogError:
        free = shutil.disk_usage(self.path.parent).free / 2**20 if self.path.parent.is_dir() else 0
        why = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        return MetricsLogError(
            f"{why} while writing {self.path} ({free:.0f} MiB free): {what}, the file ends at its last whole "
            "record; the run stops here (free space, then continue with --resume auto)"
        )

    def close(self) -> None:
        os.close(self.fd)
        if self.tb is not None:
            self.tb.close()


class LogWindow:
    """Clips, data-loader wait and wall time since the last log line (host counters, no device sync)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.clips, self.wait, self.t0 = 0, 0.0, time.perf_counter()

    def timed(self, batches: Iterable[Any]) -> Iterator[Any]:
        """`batches`, adding the time spent waiting for each one to `wait`."""
        it = iter(batches)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t
            yield batch
