"""scripts/gpu_check.sh: the CPU dry run (VP9 clips, tiny sizes) works end to end and writes its summary;
a failing or hanging step is recorded and the rest still runs; the table and summary.json come even when
every step and the report itself fail. A stub nvidia-smi stands in for the GPU machine's where the test
checks the samplers' plumbing (its figures are the stub's, never reported as measurements)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUB_NVIDIA_SMI = """#!/bin/sh
# stub: what gpu_check.sh asks nvidia-smi for, with fixed values
case "$*" in
  *--help-query-gpu*) printf '"utilization.decoder"\\nPercent of time the decoder was busy.\\n' ;;
  *utilization.decoder*) while :; do echo "$(date '+%Y/%m/%d %H:%M:%S').000, 42"; sleep 0.2; done ;;
  *memory.used*) while :; do echo 2048; sleep 0.2; done ;;
  *) exit 9 ;;
esac
"""


def run_check(out: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PY": sys.executable, "OUT": str(out), "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(["bash", "scripts/gpu_check.sh", "--data.device=cpu"], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=900)  # fmt: skip


def steps_of(summary: dict) -> dict:
    return {s["step"]: s for s in summary["steps"]}


@pytest.mark.slow
def test_gpu_check_cpu_dry_run(tmp_path, ffmpeg_available):
    run = run_check(tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check" / "summary.json").read_text())
    steps = steps_of(summary)
    assert list(steps) == ["probe", "clips-vp9_16", "prof-vp9_16-trim-on", "prof-vp9_16-trim-off", "train",
                           "synthetic", "tests"]  # fmt: skip
    assert all(s["rc"] == 0 and s["status"] == "ok" and s["seconds"] > 0 for s in steps.values())
    assert summary["failed"] == [] and "7 of 7 steps ok" in run.stdout
    runs = [r for r in summary["profiler"] if r["name"] == "DALI cpu (dali decode)"]
    assert len(runs) == 2  # data.trim on and off
    for prof in runs:
        assert prof["clips_per_s"] > 0 and prof["decoded_per_kept"] >= 1 and not prof["error"]
    for trim in ("on", "off"):  # no nvidia-smi here: n/a with the reason, not a number
        figures = steps[f"prof-vp9_16-trim-{trim}"]["figures"]
        assert figures["nvdec_util"]["why"] == "no nvidia-smi on this machine: NVDEC utilisation not sampled"
        sessions = figures["nvdec_sessions"]
        assert sessions["value"] is None and "no decoder sessions" in sessions["why"]
    assert summary["synthetic"]["clips_per_s"] > 0
    assert summary["train"]["clips_per_s"] > 0 and 0 <= summary["train"]["data_wait"] <= 1
    assert summary["train"]["vs_synthetic"] > 0 and steps["probe"]["figures"]["dali"]
    assert "vs synthetic" in run.stdout and "== [" in run.stdout and "NVDEC sessions" in run.stdout


@pytest.mark.slow
def test_gpu_check_failing_steps_still_give_the_table(tmp_path, ffmpeg_available):
    """GPU_CHECK_FAKE: the tests step hangs past its limit, train fails; every other step still runs and
    reports, the script exits 1, and the samplers run and stop around their steps (stub nvidia-smi)."""
    stub = tmp_path / "bin" / "nvidia-smi"
    stub.parent.mkdir()
    stub.write_text(STUB_NVIDIA_SMI)
    stub.chmod(0o755)
    run = run_check(tmp_path / "out", GPU_CHECK_FAKE="tests=hang,train=fail",
                    PATH=f"{stub.parent}{os.pathsep}{os.environ['PATH']}")  # fmt: skip
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    root = tmp_path / "out" / "gpu_check"
    summary = json.loads((root / "summary.json").read_text())
    steps = steps_of(summary)
    assert steps["tests"]["rc"] == 124 and steps["tests"]["status"] == "timed out"
    assert steps["train"]["rc"] == 3 and steps["train"]["status"] == "failed"
    assert steps["train"]["tail"] == ["forced failure (GPU_CHECK_FAKE)"]
    assert summary["failed"] == ["train", "tests"] and summary["train"] is None
    for trim in ("on", "off"):
        figures = steps[f"prof-vp9_16-trim-{trim}"]["figures"]
        assert steps[f"prof-vp9_16-trim-{trim}"]["rc"] == 0 and figures["clips_per_s"] > 0
        assert figures["nvdec_util"]["mean"] == figures["nvdec_util"]["max"] == 42  # the stub's samples
    assert summary["synthetic"]["clips_per_s"] > 0
    assert summary["nvsmi_decoder_fields"] == ["utilization.decoder"]
    assert "5 of 7 steps ok; not ok: train, tests" in run.stdout and "TIMED OUT" in run.stdout
    samplers = subprocess.run(["pgrep", "-f", str(stub)], capture_output=True, text=True)
    assert samplers.stdout == "", "a sampler outlived its step"


def test_table_and_summary_come_even_when_everything_fails(tmp_path):
    """PY that cannot run anything: every step fails, the Python report too; the shell still prints the
    steps and writes summary.json (report_error), and exits 1."""
    run = run_check(tmp_path, PY="/bin/false")
    assert run.returncode == 1
    summary = json.loads((tmp_path / "gpu_check" / "summary.json").read_text())
    assert summary["report_error"] and [s["rc"] for s in summary["steps"]] == [1] * 7
    assert [s["step"] for s in summary["steps"]][::3] == ["probe", "prof-vp9_16-trim-off", "tests"]
    assert "table failed: the steps as recorded" in run.stdout


def test_nvdec_utilisation_in_the_timed_window(tmp_path):
    """Samples are averaged over the step and over the profiler's timed window (local-time stamps as
    nvidia-smi prints them); unparsable output becomes a reason, not a number."""
    import importlib.util
    from datetime import datetime

    spec = importlib.util.spec_from_file_location("report", ROOT / "scripts" / "gpu_check_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    t0 = 1_800_000_000.0
    lines = [f"{datetime.fromtimestamp(t0 + 0.2 * k).strftime('%Y/%m/%d %H:%M:%S.%f')[:-3]}, {v}"
             for k, v in enumerate([0, 0, 90, 80, 70, 0])]  # fmt: skip
    samples = tmp_path / "nvdec.txt"
    samples.write_text("\n".join(lines) + "\n")
    util = report.nvdec_utilisation(samples, (t0 + 0.3, t0 + 0.9))
    assert util["samples"] == 6 and util["mean"] == 40 and util["max"] == 90
    assert util["window_samples"] == 3 and util["window_mean"] == 80 and util["window_max"] == 90
    samples.write_text('Field "utilization.decoder" is not a valid field to query.\n')
    assert "no utilization.decoder numbers" in report.nvdec_utilisation(samples, None)["why"]
    assert "no nvidia-smi" in report.nvdec_utilisation(tmp_path / "absent.txt", None)["why"]
