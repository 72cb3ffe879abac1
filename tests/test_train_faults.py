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
from engine.preemption import StopRequest
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
    """Sends this process SIGTERM while yielding batch (epoch, position) of `term_at` (the first time)."""

    def __init__(self, *a, term_at: tuple[int, int], **kw):
        super().__init__(*a, **kw)
        self.term_at = term_at

    def __iter__(self):
        for batch in super().__iter__():
            if self.mode == "train" and (self.epoch, self.position - 1) == self.term_at:
                self.term_at = (-1, -1)
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch


@pytest.mark.parametrize("term_at", [(1, 1), (0, 3)])  # mid-epoch 2; the last batch of epoch 1
def test_sigterm_checkpoints_at_the_next_step_and_resumes_bitwise(monkeypatch, tmp_path, capsys, term_at):
    common = {"train.amp": "fp32", "train.ema": 0.9, "train.epochs": 3, "model.dropout": 0.5}
    _route_loader(monkeypatch, MemoryLoader)
    full = train.train(tiny_config(tmp_path / "a", **common))
    _route_loader(monkeypatch, SignalLoader, term_at=term_at)
    cfg_b = _write_config(tmp_path / "b", **common)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert train.main([cfg_b]) == 0
        handler = signal.getsignal(signal.SIGTERM)
        assert not isinstance(getattr(handler, "__self__", None), StopRequest), "the run's handler stayed"
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    step = 4 * term_at[0] + term_at[1] + 1  # the step whose batch was in flight when the signal came
    assert f"stopped by SIGTERM at step {step}" in err and "Traceback" not in err
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
    with pytest.raises(CheckpointError, match=r"disk full: .*ckpt_e0001_s000000001\.pt needs about 1 MiB"):
        save_checkpoint(path, _state())
    assert list(tmp_path.iterdir()) == []


def test_enospc_during_the_write_names_the_file(monkeypatch, tmp_path):
    """A real ENOSPC from the kernel: the temp file is /dev/full."""
    import engine.fileio

    save_checkpoint(tmp_path / "ckpt_e0001_s000000001.pt", _state())

    def full_temp(prefix: str, suffix: str, dir: Path):
        return os.open("/dev/full", os.O_WRONLY), str(Path(dir) / f"{prefix}x{suffix}")

    monkeypatch.setattr(engine.fileio.tempfile, "mkstemp", full_temp)
    path = tmp_path / "ckpt_e0002_s000000002.pt"
    with pytest.raises(CheckpointError, match=r"disk full while writing .*ckpt_e0002_s000000002\.pt"):
        save_checkpoint(path, _state())
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
    monkeypatch.setattr(source, "die_with_parent", lambda pid: calls.append(pid))
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
