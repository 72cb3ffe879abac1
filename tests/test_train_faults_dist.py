"""Training faults under a 2-process torchrun (gloo, CPU) on real clips through the DALI loader: a rank
SIGKILLed mid-epoch (and its DALI workers gone with it), SIGTERM to one rank, a bad file on one rank.
Resumed runs end bitwise equal to an uninterrupted one. Every subprocess runs under a timeout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from engine.checkpoint import latest_checkpoint, load_checkpoint
from prep.synth import ALL_CLASSES

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
STEPS_PER_EPOCH = 8  # 32 clips, 2 ranks, batch 2


@pytest.fixture(scope="module")
def clips(tmp_path_factory, ffmpeg_available) -> Path:
    """32 training clips (8 classes x 4), 64 px, 16 frames (prep.synth)."""
    out = tmp_path_factory.mktemp("faults") / "demo"
    cmd = [sys.executable, "-m", "prep.synth", str(out), "--quiet", "--classes", *ALL_CLASSES,
           "--per-class", "4", "--val-per-class", "1", "--size", "64", "--frames", "16"]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, check=True, timeout=300)
    return out


def _cmd(clips: Path, out: Path, *extra: str, train_list: Path | None = None) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
        "configs/demo.yaml", f"--data.train_list={train_list or clips / 'train.txt'}",
        f"--data.val_list={clips / 'val.txt'}", f"--data.flip_pairs={clips / 'flip_pairs.txt'}",
        "--data.batch_size=2", "--data.input_size=32", "--data.scale_size=36", "--train.epochs=2",
        "--train.eval_every=0", "--train.log_every=1", f"--train.out_dir={out}", "--train.threads=1",
        "--train.progress=false", "--train.dist_timeout_s=60", "--model.num_classes=8", *extra,
    ]  # fmt: skip


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def uninterrupted(clips, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("full") / "run"
    proc = _run(_cmd(clips, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_checkpoint(latest_checkpoint(out))


def _assert_same_weights(a: dict, b: dict, steps: int = 2 * STEPS_PER_EPOCH) -> None:
    assert a["step"] == b["step"] == steps
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"model.{k} differs from the uninterrupted run"


def _children(pid: int) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(d.name))
    return found


def _rank_pid(torchrun_pid: int, rank: int) -> int:
    for pid in _children(torchrun_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no rank {rank} process under torchrun {torchrun_pid}")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_and_wait_for_step(cmd: list[str], out: Path, step: int, timeout: float = 240):
    """Start torchrun; return it once rank 0 has logged optimizer step `step`."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}: {proc.stderr.read()[-3000:]}")
        if metrics.is_file():
            lines = [x for x in metrics.read_text().splitlines() if x.endswith("}")]
            steps = [json.loads(x).get("step", 0) for x in lines]
            if steps and max(steps) >= step:
                return proc
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout} s")


def test_sigkill_one_rank_mid_epoch_then_resume_is_bitwise(clips, uninterrupted, tmp_path):
    """SIGKILL (the OOM killer) of rank 1 early in epoch 2: the job ends, rank 1's DALI workers die with
    it (no orphans), and `--resume auto` from the epoch-1 checkpoint ends on the uninterrupted weights."""
    out = tmp_path / "run"
    proc = _start_and_wait_for_step(_cmd(clips, out), out, STEPS_PER_EPOCH + 1)
    try:
        rank1 = _rank_pid(proc.pid, 1)
        workers = _children(rank1)
        assert workers, "rank 1 has no DALI worker processes"
        os.kill(rank1, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    deadline = time.monotonic() + 15
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), f"orphaned DALI workers {workers} outlived their rank"
    assert latest_checkpoint(out).name == f"ckpt_e0001_s{STEPS_PER_EPOCH:09d}.pt", "killed too late"
    resumed = _run(_cmd(clips, out, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_weights(uninterrupted, load_checkpoint(latest_checkpoint(out)))


def test_sigterm_to_one_rank_checkpoints_on_all_and_resumes_bitwise(clips, uninterrupted, tmp_path):
    """SIGTERM to rank 1 only: both ranks agree to stop at the next step boundary, rank 0 writes the
    checkpoint, every process exits 0 (torchrun too), no traceback; resume ends on the same weights."""
    out = tmp_path / "run"
    proc = _start_and_wait_for_step(_cmd(clips, out), out, STEPS_PER_EPOCH + 1)
    try:
        os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "stopped by SIGTERM at step" in err, err[-3000:]
    state = load_checkpoint(latest_checkpoint(out))
    assert STEPS_PER_EPOCH < state["step"] < 2 * STEPS_PER_EPOCH, state["step"]  # mid-epoch 2
    assert state["batch_in_epoch"] == state["step"] - STEPS_PER_EPOCH
    resumed = _run(_cmd(clips, out, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_weights(uninterrupted, load_checkpoint(latest_checkpoint(out)))


def test_sigterm_to_the_launcher_checkpoints_without_a_traceback(clips, tmp_path):
    """SIGTERM to the launcher (`python -m engine.launch`, torchrun's main): torchrun forwards it, the
    workers checkpoint mid-epoch and exit 0, the launcher says so in one line with rc 143."""
    out = tmp_path / "run"
    cmd = _cmd(clips, out)
    cmd[1:3] = ["-m", "engine.launch"]
    proc = _start_and_wait_for_step(cmd, out, STEPS_PER_EPOCH + 1)
    try:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=150)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "launcher: got signal 15" in err, err[-3000:]
    assert "stopped by SIGTERM at step" in err
    state = load_checkpoint(latest_checkpoint(out))
    assert STEPS_PER_EPOCH < state["step"] < 2 * STEPS_PER_EPOCH, state["step"]


def test_bad_file_on_one_rank_ends_the_job_quickly_naming_it(clips, tmp_path):
    """A file of random bytes in the list (data.skip_bad off): the rank that reads it says which list
    line and file in one line and exits 2, the other rank says in one line that it lost its peer; the job
    (both ranks, torchrun) ends in under 60 s after the error (no rank waits for a dead peer)."""
    broken = clips / "videos" / "broken.webm"
    broken.write_bytes(os.urandom(20000))
    lines = (clips / "train.txt").read_text().splitlines()
    lst = tmp_path / "train_bad.txt"
    lst.write_text("\n".join(lines[:5] + ["videos/broken.webm 16 3"] + lines[5:]) + "\n")
    cmd = _cmd(clips, tmp_path / "run", "--train.epochs=1", f"--data.root={clips}", train_list=lst)
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    err_lines: list[str] = []
    error_at = None
    reader = threading.Thread(target=lambda: err_lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if error_at is None and any(ln.startswith("error: ") for ln in list(err_lines)):
                error_at = time.monotonic()
            time.sleep(0.05)
        ended = time.monotonic()
        assert proc.poll() is not None, "the job did not end"
    finally:
        proc.kill()
    reader.join(timeout=10)
    stderr = "".join(err_lines)
    assert proc.returncode != 0
    assert f"error: {lst}:6: bad sample {broken}" in stderr, stderr[-3000:]
    ours = [ln for ln in err_lines if ln.startswith("[rank")]
    assert not ours, "a rank printed a traceback:\n" + "".join(ours[-20:])
    assert error_at is not None and ended - error_at < 60, f"the job took {ended - error_at:.0f} s to end"


LOCK_HOLDER = "import sys, time\nfrom engine.runlock import RunLock\nwith RunLock(sys.argv[1]):\n" \
              "    print('held', flush=True)\n    time.sleep(120)\n"  # fmt: skip


def test_held_run_dir_stops_every_rank_with_one_line(clips, tmp_path):
    """Another trainer holds out_dir: rank 0 names it in one line, rank 1 learns rank 0's verdict
    (no rank waits in a collective), and the job ends at once, before any loader is built."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(run)], cwd=REPO, env=_env(),
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = _run(_cmd(clips, run, "--resume", "auto"), timeout=120)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    busy = f"is in use by another trainer (pid {holder.pid}"
    assert len(errors) == 1 and busy in errors[0], proc.stderr[-3000:]
    assert not [ln for ln in proc.stderr.splitlines() if ln.startswith("[rank")], proc.stderr[-3000:]
    assert sorted(p.name for p in run.iterdir()) == ["train.lock"]
