"""What a run leaves behind besides checkpoints: its provenance (code, library and device versions) and
metrics.jsonl (one JSON record per line; TensorBoard too when it is installed: `pip install -e .[tb]`,
and a run without it says so once). Rank 0 only."""

from __future__ import annotations

import json
import logging
import platform
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


class MetricsLog:
    """metrics.jsonl (one JSON object per line, flushed) and TensorBoard when it is installed."""

    def __init__(self, out_dir: Path, resume_step: int | None) -> None:
        self.path = out_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self.file = self.path.open("a")
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

    def write(self, kind: str, step: int, **values: Any) -> None:
        self.file.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        self.file.close()
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
