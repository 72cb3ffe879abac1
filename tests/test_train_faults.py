"""Training faults, in-process on MemoryLoader batches (seconds): bad labels and run directories stop
before any heavy work, a bad sample is one line with rc 2, SIGTERM checkpoints at the next step and
resumes bitwise, a full disk names the file, a checkpoint write killed midway leaves the previous one
loadable and its temp file is removed at the next start. The same faults under a 2-process torchrun on
real clips are tests/test_train_faults_dist.py (slow)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_train_step import MemoryLoader, _restore_threads, tiny_config  # noqa: F401

import evaluate
import train
from dali_pipes.source import ClipLoadError
from engine.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from engine.config import dump_yaml
from engine.preflight import STALE_CKPT_TMP, remove_stale_checkpoint_temps

REPO = Path(__file__).resolve().parents[1]


def _write_config(tmp_path: Path, **overrides) -> str:
    path = tmp_path / "cfg.yaml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_yaml(tiny_config(tmp_path, **overrides)))
    return str(path)


def _no_loader(monkeypatch) -> None:
    import dali_pipes.loader

    def refuse(*a, **kw):
        raise AssertionError("a loader was built before the preflight check failed")

    monkeypatch.setattr(dali_pipes.loader, "build_loader", refuse)


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("label", [5, 9])  # num_classes is 5: 5 is the first label out of range
def test_label_out_of_range_fails_before_loaders(monkeypatch, tmp_path, capsys, label):
    _no_loader(monkeypatch)
    lst = tmp_path / "train.txt"
    lst.write_text(f"a.webm 16 0\n# a comment\nb.webm 16 {label}\nc.webm 16 1\n")
    cfg = _write_config(tmp_path, **{"data.train_list": str(lst), "train.eval_every": 0})
    assert train.main([cfg]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{lst}:3: label {label} is outside [0, 5)" in line and "model.num_classes" in line


def test_val_label_out_of_range_fails_before_loaders(monkeypatch, tmp_path, capsys):
    _no_loader(monkeypatch)
    (tmp_path / "train.txt").write_text("a.webm 16 0\n")
    (tmp_path / "val.txt").write_text("a.webm 16 0\nb.webm 16 7\n")
    lists = {"data.train_list": str(tmp_path / "train.txt"), "data.val_list": str(tmp_path / "val.txt")}
    cfg = _write_config(tmp_path, **lists)
    assert train.main([cfg]) == 2
    assert "val.txt:2: label 7" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("kind", ["file", "parent_file"])
def test_unwritable_out_dir_fails_before_loaders(monkeypatch, tmp_path, capsys, kind):
    """A file where the run directory (or a parent of it) should be. (A read-only folder fails the same
    write probe; these tests run as root here, which writes anywhere, so that case is not asserted.)"""
    _no_loader(monkeypatch)
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    out = blocker if kind == "file" else blocker / "run"
    cfg = _write_config(tmp_path, **{"train.out_dir": str(out)})
    assert train.main([cfg]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "train.out_dir" in line and str(blocker) in line
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("lr", ["-0.01", "0", ".nan", ".inf"])
def test_invalid_lr_fails_at_config_load_naming_the_key(monkeypatch, tmp_path, capsys, lr):
    """Not torch's "Invalid learning rate" (no key) after the loaders and the model are built."""
    _no_loader(monkeypatch)
    assert train.main([_write_config(tmp_path), f"--optim.lr={lr}"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"error: command line: --optim.lr={lr}: optim.lr: must be" in line


def test_exponent_lr_trains(monkeypatch, tmp_path):
    _route_loader(monkeypatch, MemoryLoader)
    cfg = _write_config(tmp_path, **{"train.stop_at_step": 1, "train.eval_every": 0})
    assert train.main([cfg, "--optim.lr=5e-2"]) == 0
    assert load_checkpoint(latest_checkpoint(tmp_path / "run"))["config"]["optim"]["lr"] == 0.05


def test_resume_of_a_checkpoint_trained_as_another_model_is_refused(monkeypatch, tmp_path, capsys):
    """A TSN checkpoint fits a TSM config's weights exactly (the shift has none): resuming it under TSM
    would train on silently as another network, so it is refused in one line, as evaluate.py does."""
    _route_loader(monkeypatch, MemoryLoader)
    train.train(tiny_config(tmp_path, "tsn", **{"train.epochs": 1, "train.eval_every": 0}))
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    capsys.readouterr()
    assert train.main([_write_config(tmp_path, **{"model.name": "tsm"}), "--resume", "auto"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "was trained as another model: model.name 'tsn' in the checkpoint, 'tsm' configured" in line
    assert "--model.pretrained=CHECKPOINT" in line
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before  # nothing written
    assert train.main([_write_config(tmp_path, **{"model.name": "tsn"}), "--resume", "auto"]) == 0


def test_resume_of_a_weights_only_file_is_one_line(monkeypatch, tmp_path, capsys):
    """A models.convert output (weights and meta, no training state) is for model.pretrained."""
    _route_loader(monkeypatch, MemoryLoader)
    converted = save_checkpoint(tmp_path / "converted.pt", {"model": {}, "meta": {"model": "tsm"}})
    assert train.main([_write_config(tmp_path), "--resume", str(converted)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{converted}: not a train.py checkpoint (no optimizer, scheduler, scaler)" in line
    assert "--model.pretrained" in line


@pytest.mark.parametrize(
    "classes_txt, warned",
    [
        (None, "train.txt has labels 0..2 (3 classes)"),  # max label + 1
        (5, ""),  # classes.txt names 5 classes: the labels of this list are a subset, no warning
        (7, "classes.txt names 7 classes"),
    ],
)
def test_num_classes_other_than_the_lists_classes_warns_once(
    monkeypatch, tmp_path, capsys, classes_txt, warned
):
    """model.num_classes is 5; the list's classes are classes.txt's names beside it, else max label + 1.
    Labels beyond num_classes are an error (test_label_out_of_range_fails_before_loaders)."""
    _route_loader(monkeypatch, MemoryLoader)
    lst = tmp_path / "lists" / "train.txt"
    lst.parent.mkdir()
    lst.write_text("a.webm 16 0\nb.webm 16 2\nc.webm 16 1\n")
    if classes_txt:
        (lst.parent / "classes.txt").write_text("".join(f"class{i}\n" for i in range(classes_txt)))
    overrides = {"data.train_list": str(lst), "train.eval_every": 0, "train.stop_at_step": 1}
    assert train.main([_write_config(tmp_path, **overrides)]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: model.num_classes is 5")]
    if warned:
        assert len(warnings) == 1 and warned in warnings[0], err
    else:
        assert warnings == [], err


class BadSampleLoader(MemoryLoader):
    """Raises what the DALI loader raises for an unreadable sample with data.skip_bad off."""

    def __iter__(self):
        for k, batch in enumerate(super().__iter__()):
            if k == 1:
                raise ClipLoadError("lists/train.txt:7: bad sample /data/v/broken.webm: moov atom not found")
            yield batch


def _route_loader(monkeypatch, cls, **kwargs) -> None:
    import dali_pipes.loader

    monkeypatch.setattr(dali_pipes.loader, "build_loader", lambda *a, **kw: cls(*a, **kw, **kwargs))


def test_bad_sample_is_one_line_rc2(monkeypatch, tmp_path, capsys):
    _route_loader(monkeypatch, BadSampleLoader)
    assert train.main([_write_config(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error: lists/train.txt:7: bad sample /data/v/broken.webm: moov atom not found" in err
    assert "Traceback" not in err


def test_evaluate_bad_label_and_bad_sample_are_one_line_rc2(monkeypatch, tmp_path, capsys):
    _route_loader(monkeypatch, MemoryLoader)
    out = train.train(tiny_config(tmp_path, **{"train.epochs": 1, "train.eval_every": 0}))
    capsys.readouterr()
    (tmp_path / "val.txt").write_text("a.webm 16 0\nb.webm 16 5\n")
    args = ["--checkpoint", out["checkpoint"], f"--data.val_list={tmp_path / 'val.txt'}"]
    assert evaluate.main(args) == 2
    assert "val.txt:2: label 5 is outside [0, 5)" in _one_error_line(capsys.readouterr().err)
    (tmp_path / "val.txt").write_text("a.webm 16 0\nb.webm 16 4\n")
    _route_loader(monkeypatch, BadSampleLoader, videos=8)
    assert evaluate.main([*args, "--data.batch_size=2"]) == 2
    assert "broken.webm: moov atom not found" in _one_error_line(capsys.readouterr().err)


class SignalLoader(MemoryLoader):
    """Sends this process `sig` while yielding batch (epoch, position) of `term_at` (the first time)."""

    def __init__(self, *a, term_at: tuple[int, int], sig: int = signal.SIGTERM, **kw):
        super().__init__(*a, **kw)
        self.term_at, self.sig = term_at, sig

    def __iter__(self):
        for batch in super().__iter__():
            if self.mode == "train" and (self.epoch, self.position - 1) == self.term_at:
                self.term_at = (-1, -1)
                os.kill(os.getpid(), self.sig)
            yield batch


@pytest.mark.parametrize(
    "term_at, sig",  # mid-epoch 2; the last batch of epoch 1; Ctrl-C (SIGINT) mid-epoch 2
    [((1, 1), signal.SIGTERM), ((0, 3), signal.SIGTERM), ((1, 1), signal.SIGINT)],
)
def test_stop_signal_checkpoints_at_the_next_step_and_resumes_bitwise(monkeypatch, tmp_path, capsys, term_at,
                                                                     sig):
    """SIGTERM (rc 0: a scheduler's preemption) and SIGINT (rc 130: Ctrl-C, no KeyboardInterrupt traceback)
    both checkpoint at the next step; the resumed run ends bitwise where an uninterrupted one does."""
    common = {"train.amp": "fp32", "train.ema": 0.9, "train.epochs": 3, "model.dropout": 0.5}
    _route_loader(monkeypatch, MemoryLoader)
    full = train.train(tiny_config(tmp_path / "a", **common))
    _route_loader(monkeypatch, SignalLoader, term_at=term_at, sig=sig)
    cfg_b = _write_config(tmp_path / "b", **common)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert train.main([cfg_b]) == (130 if sig == signal.SIGINT else 0)
        for s, handler in previous.items():
            assert signal.getsignal(s) is handler, "the run's handlers stayed"
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    err = capsys.readouterr().err
    step = 4 * term_at[0] + term_at[1] + 1  # the step whose batch was in flight when the signal came
    assert f"stopped by {signal.Signals(sig).name} at step {step}" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    ckpt = latest_checkpoint(tmp_path / "b" / "run")
    state = load_checkpoint(ckpt)
    assert state["step"] == step and (state["epoch"], state["batch_in_epoch"]) == (term_at[0], term_at[1] + 1)
    _route_loader(monkeypatch, MemoryLoader)
    assert train.main([cfg_b, "--resume", "auto"]) == 0
    a, b = load_checkpoint(full["checkpoint"]), load_checkpoint(latest_checkpoint(tmp_path / "b" / "run"))
    assert a["step"] == b["step"] == 12
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs after a SIGTERM and resume"


def test_skipped_samples_are_summed_into_the_epoch_record(monkeypatch, tmp_path):
    class SkippingLoader(MemoryLoader):
        skipped = 0

        def __iter__(self):
            for batch in super().__iter__():
                self.skipped += 1  # one replaced sample per batch
                yield batch

    _route_loader(monkeypatch, SkippingLoader)
    out = train.train(tiny_config(tmp_path, **{"train.epochs": 2, "train.eval_every": 0}))
    assert out["skipped_samples"] == 8
    import json

    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [(r["skipped"], r["skipped_per_rank"]) for r in epochs] == [(4, [4]), (4, [4])]


# ---- checkpoint files: full disk, killed writes, stale temps ------------------------------------------


def _state() -> dict:
    return {"model": {"w": torch.arange(1000, dtype=torch.float32)}, "step": 1}


def test_too_little_free_space_refuses_before_writing(monkeypatch, tmp_path):
    import engine.checkpoint

    real = engine.checkpoint.shutil.disk_usage
    monkeypatch.setattr(engine.checkpoint.shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    path = tmp_path / "ckpt_e0001_s000000001.pt"
    needs = r"disk full: .*ckpt_e0001_s000000001\.pt needs about 1 MiB"
    with pytest.raises(CheckpointError, match=needs) as e:
        save_checkpoint(path, _state())
    assert "(no earlier checkpoint)" in str(e.value) and "is kept" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_enospc_during_the_write_names_the_file(monkeypatch, tmp_path):
    """A real ENOSPC from the kernel: the temp file is /dev/full."""
    import engine.fileio

    save_checkpoint(tmp_path / "ckpt_e0001_s000000001.pt", _state())

    def full_temp(prefix: str, suffix: str, dir: Path):
        return os.open("/dev/full", os.O_WRONLY), str(Path(dir) / f"{prefix}x{suffix}")

    monkeypatch.setattr(engine.fileio.tempfile, "mkstemp", full_temp)
    path = tmp_path / "ckpt_e0002_s000000002.pt"
    with pytest.raises(CheckpointError, match=r"disk full while writing .*ckpt_e0002_s000000002\.pt") as e:
        save_checkpoint(path, _state())
    assert "the previous checkpoint ckpt_e0001_s000000001.pt is kept" in str(e.value)
    assert not path.exists() and latest_checkpoint(tmp_path).name == "ckpt_e0001_s000000001.pt"


KILLED_WRITER = textwrap.dedent("""
    import io, sys, time, torch
    from engine.checkpoint import save_checkpoint
    out = sys.argv[1]
    save_checkpoint(f"{out}/ckpt_e0001_s000000004.pt", {"model": {"w": torch.ones(10)}, "step": 4})
    real_save = torch.save
    def slow_save(state, f):
        buf = io.BytesIO()
        real_save(state, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        print("half written", flush=True)
        time.sleep(60)
    torch.save = slow_save
    save_checkpoint(f"{out}/ckpt_e0002_s000000008.pt", {"model": {"w": torch.zeros(100000)}, "step": 8})
""")


def test_kill_during_checkpoint_write_keeps_the_previous_and_start_removes_the_temp(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "half written"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    temps = [p for p in tmp_path.iterdir() if STALE_CKPT_TMP.match(p.name)]
    assert len(temps) == 1 and temps[0].stat().st_size > 0
    newest = latest_checkpoint(tmp_path)
    assert newest.name == "ckpt_e0001_s000000004.pt"
    assert load_checkpoint(newest)["step"] == 4
    # the next start removes our temp only: other hidden .tmp files are not ours
    (tmp_path / ".notes.txt.abc.tmp").write_text("someone else's")
    (tmp_path / "ckpt_e0002_s000000008.pt.tmp").write_text("no leading dot: not atomic_write's")
    assert remove_stale_checkpoint_temps(tmp_path) == temps
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".notes.txt.abc.tmp", "ckpt_e0001_s000000004.pt", "ckpt_e0002_s000000008.pt.tmp",
    ]  # fmt: skip


def test_train_start_removes_stale_checkpoint_temps(monkeypatch, tmp_path, capsys):
    _route_loader(monkeypatch, MemoryLoader)
    run = tmp_path / "run"
    run.mkdir()
    stale = run / ".ckpt_e0003_s000000012.pt.k2j4_x.tmp"
    stale.write_bytes(b"PK half a checkpoint")
    train.train(tiny_config(tmp_path, **{"train.epochs": 1, "train.eval_every": 0}))
    assert not stale.exists()
    assert f"removed {stale.name}" in capsys.readouterr().err


ORPHAN_PARENT = textwrap.dedent("""
    import os, sys, time
    from dali_pipes.source import die_with_parent
    parent = os.getpid()
    pids = []
    for arm in (True, False):
        pid = os.fork()
        if pid == 0:  # a worker blocked where it never notices its parent's death (a hung decode)
            if arm:
                die_with_parent(parent)
            time.sleep(60)
            os._exit(0)
        pids.append(pid)
    time.sleep(0.5)  # both children past die_with_parent
    print(*pids, flush=True)
    time.sleep(60)
""")


def test_die_with_parent_kills_a_worker_when_its_trainer_is_sigkilled(tmp_path):
    """The PR_SET_PDEATHSIG a DALI worker sets on its first sample (ClipSource.__call__): a SIGKILLed
    parent takes the armed child with it; the unarmed control child survives as an orphan, which shows
    the test can tell the two apart."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", ORPHAN_PARENT], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    armed = control = 0
    try:
        armed, control = (int(x) for x in proc.stdout.readline().split())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _running(armed) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(armed), "the armed worker outlived its parent"
        assert _running(control), "the control child died too: the test cannot tell"
    finally:
        proc.kill()
        for pid in (armed, control):
            if pid and _running(pid):
                os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_clip_source_arms_workers_only(monkeypatch):
    """ClipSource calls die_with_parent in worker processes (pid != the trainer's), never in the trainer."""
    import dali_pipes.source as source

    calls = []
    monkeypatch.setattr(source, "die_with_parent", lambda pid, ignore_sigint: calls.append(pid))
    src = source.ClipSource.__new__(source.ClipSource)
    src.owner_pid, src.base_epoch, src.start_batch, src.batch, src.kind = os.getpid(), 0, 0, 1, "pyav"
    src._orders = {0: []}
    src.order = lambda epoch: []

    class Info:
        epoch_idx, idx_in_epoch = 0, 0

    with pytest.raises(StopIteration):
        src(Info())
    assert calls == []
    src.owner_pid = os.getpid() + 1  # as seen from a forked worker
    with pytest.raises(StopIteration):
        src(Info())
    assert calls == [os.getpid() + 1]


# ---- one writer per run directory; an empty out_dir; free space at the start ---------------------------

LOCK_HOLDER = textwrap.dedent("""
    import sys, time
    from engine.runlock import RunLock
    with RunLock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(60)
""")


def test_second_trainer_in_a_held_run_dir_is_one_line_naming_the_holder(monkeypatch, tmp_path, capsys):
    """A trainer (here: a process holding the lock) owns out_dir; a second `--resume auto` there stops
    before it builds or writes anything, naming the holder's pid and host."""
    import socket

    _no_loader(monkeypatch)
    run = tmp_path / "run"
    run.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(run)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert train.main([_write_config(tmp_path), "--resume", "auto"]) == 2
    finally:
        holder.kill()
        holder.wait(timeout=30)
    line = _one_error_line(capsys.readouterr().err)
    host = socket.gethostname()
    assert f"train.out_dir: {run} is in use by another trainer (pid {holder.pid} on host {host}" in line
    assert sorted(p.name for p in run.iterdir()) == ["train.lock"]  # no config.yaml, metrics, checkpoint


def test_stale_lock_of_a_dead_trainer_is_taken_over_with_one_line(monkeypatch, tmp_path, capsys):
    """A lock file left by a SIGKILLed trainer (its text, no lock held): the next start takes it over
    and says so; a clean end empties the file, so a following start says nothing about it."""
    import json
    import socket

    _route_loader(monkeypatch, MemoryLoader)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    holder = {"pid": dead.pid, "host": socket.gethostname(), "started": "yesterday", "command": "train.py x"}
    (run / "train.lock").write_text(json.dumps(holder))
    cfg = _write_config(tmp_path, **{"train.epochs": 1, "train.eval_every": 0})
    assert train.main([cfg]) == 0
    err = capsys.readouterr().err
    took = [ln for ln in err.splitlines() if "stale lock" in ln]
    assert len(took) == 1 and f"pid {dead.pid}" in took[0] and "not running" in took[0], err
    assert (run / "train.lock").read_text() == ""  # released at the end
    assert train.main([cfg, "--resume", "auto"]) == 0  # the same process takes it again: released for real
    assert "stale lock" not in capsys.readouterr().err


def test_run_lock_is_released_for_forked_children_too(tmp_path):
    """Forked loader workers share the lock's open file: release() must unlock it, not only close it."""
    from engine.runlock import RunDirBusyError, RunLock

    lock = RunLock(tmp_path).__enter__()
    child = os.fork()
    if child == 0:  # holds a copy of the fd, like a DALI worker
        time.sleep(5)
        os._exit(0)
    try:
        with pytest.raises(RunDirBusyError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
        lock.release()
        with RunLock(tmp_path):
            pass
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


@pytest.mark.parametrize("value", ["", "  "])
def test_empty_out_dir_is_refused_naming_the_key(monkeypatch, tmp_path, capsys, value):
    _no_loader(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert train.main([_write_config(tmp_path), f"--train.out_dir={value}"]) == 2
    assert "train.out_dir: empty" in _one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]


def test_too_little_space_for_one_checkpoint_is_found_at_the_start(monkeypatch, tmp_path, capsys):
    """The estimate (model + SGD momentum, from a meta-device model) against the free space, before any
    loader is built: not at the first checkpoint an epoch later."""
    import engine.preflight

    _no_loader(monkeypatch)
    real = engine.preflight.shutil.disk_usage
    monkeypatch.setattr(engine.preflight.shutil, "disk_usage", lambda p: real(p)._replace(free=3 << 20))
    assert train.main([_write_config(tmp_path)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    run = tmp_path / "run"
    assert f"train.out_dir: {run} has 3 MiB free, one checkpoint needs about" in line
    need = int(line.split("needs about ")[1].split(" MiB")[0])
    assert need > 3
    assert not (run / "metrics.jsonl").exists() and latest_checkpoint(run) is None


# ---- no process outlives the command that started it ------------------------------------------------


def _marked_processes(mark: str) -> list[tuple[int, str]]:
    """(pid, cmdline) of the live processes whose environment holds `mark` (every descendant of a process
    started with it inherits it: pool children, DALI workers, multiprocessing's resource tracker)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if mark.encode() in (d / "environ").read_bytes() and _running(int(d.name)):
                found.append((int(d.name), (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except OSError:  # gone meanwhile, or not ours
            continue
    return found


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    """prep.synth's smallest set: 12 train and 6 val clips (its 6 demo classes) of 8 frames, 32 px."""
    data = tmp_path_factory.mktemp("synth") / "data"
    synth = [sys.executable, "-m", "prep.synth", str(data), "--per-class", "2", "--val-per-class", "1",
             "--frames", "8", "--size", "32", "--quiet"]  # fmt: skip
    subprocess.run(synth, cwd=REPO, check=True, timeout=120)
    return data


@pytest.mark.slow  # 21 s on 2 busy cores
def test_ctrl_c_in_a_terminal_checkpoints_and_exits_130_without_a_traceback(synth_data, tmp_path):
    """Ctrl-C reaches the whole foreground process group: the trainer and its DALI worker. The worker
    leaves the decision to the trainer, which checkpoints at the next step, says so in one line and
    exits 130; nothing of the job is left running."""
    tag = f"{os.getpid()}_{time.monotonic_ns()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "VIDREC_TEST_MARK": tag, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "configs/demo.yaml", f"--data.train_list={synth_data / 'train.txt'}",
           f"--data.val_list={synth_data / 'val.txt'}", f"--data.flip_pairs={synth_data / 'flip_pairs.txt'}",
           "--data.batch_size=2", "--train.log_every=1", "--train.epochs=50",
           f"--train.out_dir={out}"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,  # its own group: a terminal's foreground job
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("step 3 "):
                os.killpg(proc.pid, signal.SIGINT)
                break
        lines += proc.stderr.readlines()
        assert proc.wait(timeout=60) == 130, "".join(lines[-20:])
    finally:
        proc.kill()
    err = "".join(lines)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    stopped = [ln for ln in lines if "stopped by SIGINT" in ln]
    assert len(stopped) == 1 and "continue with --resume auto" in stopped[0], err[-3000:]
    assert load_checkpoint(latest_checkpoint(out))["step"] >= 3
    assert _marked_processes(f"VIDREC_TEST_MARK={tag}") == []


def test_sigkilled_demo_leaves_no_process_behind(synth_data, tmp_path):
    """`python -m demo` SIGKILLed mid-training (a time limit running out): its two spawned training
    processes, their DALI workers and multiprocessing's resource tracker all end with it. (Without
    engine.lifetime.pool_options in demo.py the two trainings and the tracker survive it: checked.)"""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("the demo trains in a process pool only with 2 or more cores")
    data = synth_data
    tag = f"{os.getpid()}_{time.monotonic_ns()}"
    mark = f"VIDREC_TEST_MARK={tag}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "VIDREC_TEST_MARK": tag, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "demo", "--data", str(data), "--out", str(tmp_path / "runs"), "--epochs",
           "50"]  # fmt: skip
    demo = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    seen: list[tuple[int, str]] = []
    try:
        deadline = time.monotonic() + 240
        for line in demo.stderr:  # wait until both trainings have made a step
            if "] step " in line:
                seen = _marked_processes(mark)
                if sum("spawn_main" in c for _, c in seen) >= 2:
                    break
            assert time.monotonic() < deadline, "the demo did not start training in time"
        assert any("resource_tracker" in c for _, c in seen), seen  # the helpers the test is about exist
        demo.send_signal(signal.SIGKILL)
        demo.wait(timeout=30)
        deadline = time.monotonic() + 20
        while _marked_processes(mark) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _marked_processes(mark)
        assert left == [], f"processes outlived the SIGKILLed demo (of {len(seen)} it had): {left}"
    finally:
        demo.kill()
        for pid, _ in _marked_processes(mark):
            os.kill(pid, signal.SIGKILL)


POOL_PARENT = textwrap.dedent("""
    import time
    from prep.common import parallel_map
    print("mapping", flush=True)
    for _ in parallel_map(time.sleep, [60] * 4, jobs=2, description="sleep", quiet=True):
        pass
""")


def test_sigkilled_prep_tool_leaves_no_pool_worker_behind():
    """prep's parallel_map (resize, lists, validate, packet index): its process pool dies with the tool."""
    tag = f"{os.getpid()}_{time.monotonic_ns()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "VIDREC_TEST_MARK": tag}
    proc = subprocess.Popen([sys.executable, "-c", POOL_PARENT], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    mark = f"VIDREC_TEST_MARK={tag}"
    try:
        assert proc.stdout.readline().strip() == "mapping"
        deadline = time.monotonic() + 30
        while len(_marked_processes(mark)) < 3 and time.monotonic() < deadline:  # the tool + 2 workers
            time.sleep(0.1)
        assert len(_marked_processes(mark)) >= 3
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _marked_processes(mark) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _marked_processes(mark) == [], "pool workers outlived the SIGKILLed tool"
    finally:
        proc.kill()
        for pid, _ in _marked_processes(mark):
            os.kill(pid, signal.SIGKILL)


# ---- metrics.jsonl: never torn -------------------------------------------------------------------------


def _records(path: Path) -> list[dict]:
    import json

    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]  # every line whole


def test_torn_metrics_line_is_removed_before_the_next_start_appends(monkeypatch, tmp_path, capsys):
    """A metrics.jsonl ending in half a record (a run that died before its first checkpoint; a power
    loss): the next start cuts it off, says so, and appends whole records after the last whole one."""
    _route_loader(monkeypatch, MemoryLoader)
    run = tmp_path / "run"
    run.mkdir()
    whole = '{"kind": "start", "step": 0}\n'
    torn = '{"kind": "train", "step": 1, "lo'
    (run / "metrics.jsonl").write_text(whole + torn)
    assert train.main([_write_config(tmp_path, **{"train.epochs": 1, "train.eval_every": 0})]) == 0
    assert f"metrics.jsonl: removed a torn last line ({len(torn)} bytes" in capsys.readouterr().err
    records = _records(run / "metrics.jsonl")
    assert records[0] == {"kind": "start", "step": 0} and records[1]["kind"] == "start"


def test_enospc_while_writing_metrics_is_one_line_and_leaves_no_torn_record(monkeypatch, tmp_path, capsys):
    """The disk fills during a metrics record: half of it reaches the file, then ENOSPC. The run stops
    with one line naming the file (rc 2, no OSError traceback); the half record is cut off again."""
    import errno

    _route_loader(monkeypatch, MemoryLoader)
    real_write, calls = os.write, []

    def filling_write(fd: int, data) -> int:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl")
        except OSError:
            target = False
        if not target:
            return real_write(fd, data)
        calls.append(len(data))
        if len(calls) == 4:  # the 4th record: half written
            return real_write(fd, bytes(data[: len(data) // 2]))
        if len(calls) > 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", filling_write)
    assert train.main([_write_config(tmp_path, **{"train.eval_every": 0})]) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in err and "OSError" not in err, err
    line, path = errors[0], tmp_path / "run" / "metrics.jsonl"
    assert f"disk full while writing {path}" in line and "is not written" in line
    assert len(_records(path)) == 3  # the three whole records before it, nothing after


def test_run_lock_without_flock_goes_by_the_pid_and_host(monkeypatch, tmp_path, capsys):
    """A filesystem without flock (ENOLCK): a live pid on this host holds the directory, another host
    holds it too (its pid cannot be checked from here), a dead pid on this host is taken over."""
    import errno
    import json
    import socket

    import engine.runlock
    from engine.runlock import RunDirBusyError, RunLock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(engine.runlock.fcntl, "flock", no_flock)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = socket.gethostname()
    for pid, host, busy in [(os.getppid(), here, True), (dead.pid, "node-17", True), (dead.pid, here, False)]:
        holder = {"pid": pid, "host": host, "started": "t", "command": "c"}
        (tmp_path / "train.lock").write_text(json.dumps(holder))
        if busy:
            with pytest.raises(RunDirBusyError, match=f"pid {pid} on host {host}"):
                RunLock(tmp_path).acquire()
        else:
            with RunLock(tmp_path, say=print):
                assert json.loads((tmp_path / "train.lock").read_text())["pid"] == os.getpid()
            took = f"took over the stale lock {tmp_path / 'train.lock'} of pid {pid}"
            assert took in capsys.readouterr().out
