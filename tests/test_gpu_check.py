"""scripts/gpu_check.sh's CPU dry run (VP9 clips, tiny sizes) works end to end and writes its summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_dry_run(tmp_path, ffmpeg_available):
    env = {**os.environ, "PY": sys.executable, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT)}
    run = subprocess.run(["bash", "scripts/gpu_check.sh", "--data.device=cpu"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check" / "summary.json").read_text())
    runs = [r for r in summary["profiler"] if r["name"] == "DALI cpu (dali decode)"]
    assert len(runs) == 2  # data.trim on and off
    for prof in runs:
        assert prof["clips_per_s"] > 0 and prof["decoded_per_kept"] >= 1 and not prof["error"]
    assert summary["synthetic"]["clips_per_s"] > 0
    assert summary["train"]["clips_per_s"] > 0 and 0 <= summary["train"]["data_wait"] <= 1
    assert "vs synthetic" in run.stdout and "gpu-marked tests" in run.stdout
