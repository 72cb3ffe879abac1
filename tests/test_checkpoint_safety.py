"""No code from a checkpoint, ever (issue 23): a hostile checkpoint whose pickle calls `os.system`
(`posix.system`), `builtins.exec`, a `getattr`-fetched method and `numpy.ndarray.tofile` (a method of an
allowlisted class), each of which would create a marker file, goes through every command that opens
checkpoints (train.py --model.pretrained and --resume, evaluate.py, python -m predict, python -m
models.convert with and without --trust), in the torch.save zip format and the legacy pickle format. No
marker may appear; each command fails with one line naming the file, or (models.convert, payload beside
real weights) converts the tensors. The reader itself (engine/safe_load.py) is tested on what official
files carry: NumPy, OrderedDict metadata, parameters, argparse args, bytes, sets, mmengine's ConfigDict."""

from __future__ import annotations

import argparse
import builtins
import collections
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from test_convert_layouts import model_cfg, official_layout, randomised
from test_train_faults import _one_error_line, _route_loader, _write_config
from test_train_step import MemoryLoader, _restore_threads  # noqa: F401

import evaluate
import predict
import train
from engine.checkpoint import CheckpointError, load_checkpoint
from engine.safe_load import Inert, SafeLoadError, safe_load
from models import build_model, read_state_dict
from models.convert import main as convert_main

REPO = Path(__file__).resolve().parents[1]
FORMATS = ["zip", "legacy"]  # torch.save's default, and _use_new_zipfile_serialization=False (< 1.6)


class Call:
    """Pickles as `fn(*args)`: what a hostile file's `__reduce__` makes the unpickler run."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def payloads(markers: Path) -> dict[str, Call]:
    """Four ways to run code at load time; each would create its own file in `markers`."""
    markers.mkdir(exist_ok=True)
    return {
        "system": Call(os.system, f"touch {markers / 'system'}"),  # pickled as posix.system
        "exec": Call(builtins.exec, f"open({str(markers / 'exec')!r}, 'w').close()"),
        "getattr": Call(Path(markers / "getattr").touch),  # getattr(PosixPath(...), 'touch')()
        # a method of an allowlisted class: getattr(numpy.ndarray, 'tofile')(array, path) writes a file
        "tofile": Call(np.ndarray.tofile, np.zeros(1), str(markers / "tofile")),
    }


def save(obj: object, path: Path, fmt: str) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")
    return path


@pytest.fixture
def hostile(tmp_path: Path, request) -> tuple[Path, Path]:
    """(file, marker folder): a checkpoint-shaped dict whose every value is a payload."""
    markers = tmp_path / "markers"
    calls = payloads(markers)
    obj = {"model": calls["system"], "state_dict": calls["exec"], "config": calls["getattr"],
           "meta": calls["tofile"]}  # fmt: skip
    return save(obj, tmp_path / f"evil_{request.param}.pt", request.param), markers


def assert_nothing_ran(markers: Path) -> None:
    assert sorted(p.name for p in markers.iterdir()) == [], "a checkpoint ran code"


def test_the_payloads_do_run_under_a_plain_unpickler(tmp_path: Path) -> None:
    """The test's own premise: torch.load(weights_only=False) runs each payload (so their absence below
    means the reader stopped them, not that they were harmless)."""
    markers = tmp_path / "markers"
    for name, call in payloads(markers).items():
        torch.load(save(call, tmp_path / f"{name}.pt", "zip"), weights_only=False)
    assert sorted(p.name for p in markers.iterdir()) == ["exec", "getattr", "system", "tofile"]


@pytest.mark.parametrize("hostile", FORMATS, indirect=True)
def test_safe_load_gives_inert_stand_ins(hostile) -> None:
    path, markers = hostile
    loaded = safe_load(path)
    assert_nothing_ran(markers)
    expected = {"posix.system", "builtins.exec", "pathlib.PosixPath", "numpy.ndarray.tofile"}
    assert expected <= set(loaded.foreign)
    assert all(isinstance(v, Inert) for v in loaded.obj.values())
    assert type(loaded.obj["config"]).__qualname__ == "PosixPath.touch"  # the fetched method, a stand-in


@pytest.mark.parametrize("hostile", FORMATS, indirect=True)
def test_train_pretrained_refuses_in_one_line(hostile, monkeypatch, tmp_path, capsys) -> None:
    path, markers = hostile
    _route_loader(monkeypatch, MemoryLoader)
    assert train.main([_write_config(tmp_path / "cfg"), f"--model.pretrained={path}"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(path) in line and "expected a state dict of tensors" in line and "posix.system" in line
    assert_nothing_ran(markers)


@pytest.mark.parametrize("hostile", FORMATS, indirect=True)
def test_train_resume_refuses_in_one_line(hostile, monkeypatch, tmp_path, capsys) -> None:
    path, markers = hostile
    _route_loader(monkeypatch, MemoryLoader)
    assert train.main([_write_config(tmp_path / "cfg"), "--resume", str(path)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{path}: not a vidrec checkpoint: holds Python objects" in line and "posix.system" in line
    assert_nothing_ran(markers)


@pytest.mark.parametrize("hostile", FORMATS, indirect=True)
def test_evaluate_refuses_in_one_line(hostile, capsys) -> None:
    path, markers = hostile
    assert evaluate.main(["--checkpoint", str(path)]) == 2
    assert "not a vidrec checkpoint" in _one_error_line(capsys.readouterr().err)
    assert_nothing_ran(markers)


@pytest.mark.parametrize("hostile", FORMATS, indirect=True)
def test_predict_refuses_in_one_line(hostile, tmp_path, capsys) -> None:
    path, markers = hostile
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\0" * 64)  # never opened: the checkpoint is read first
    assert predict.main([str(path), str(video)]) == 2
    assert "not a vidrec checkpoint" in _one_error_line(capsys.readouterr().err)
    assert_nothing_ran(markers)


@pytest.mark.parametrize("trust", [[], ["--trust"]], ids=["plain", "trust"])
@pytest.mark.parametrize("hostile", FORMATS, indirect=True)
def test_convert_refuses_a_file_of_payloads(hostile, tmp_path, capsys, trust) -> None:
    path, markers = hostile
    argv = [str(path), str(tmp_path / "out.pt"), "--from", "tsm", "--model", "tsm", "--debug", *trust]
    assert convert_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no state dict found" in err and "posix.system" in err
    assert_nothing_ran(markers)
    assert not (tmp_path / "out.pt").exists()


@pytest.fixture(scope="module")
def tsm_official() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = randomised(build_model(model_cfg("tsm"))).state_dict()
    return official_layout("tsm", "tsm", state)


@pytest.mark.parametrize("trust", [[], ["--trust"]], ids=["plain", "trust"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_takes_the_tensors_beside_payloads(tmp_path, capsys, tsm_official, fmt, trust) -> None:
    markers = tmp_path / "markers"
    src = save({"state_dict": tsm_official, **payloads(markers)}, tmp_path / "tsm.pth.tar", fmt)
    dst = tmp_path / "out.pt"
    argv = [str(src), str(dst), "--from", "tsm", "--model", "tsm", "--debug", *trust]
    assert convert_main(argv) == 0
    assert "inert stand-ins, none run: posix.system, builtins.exec" in capsys.readouterr().out
    assert_nothing_ran(markers)
    converted = load_checkpoint(dst)  # plain again: what train.py / evaluate.py read
    assert converted["meta"]["stand_ins"][:2] == ["posix.system", "builtins.exec"]
    assert len(converted["model"]) == len(tsm_official)


@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_cli_process_with_trust(tmp_path, fmt) -> None:
    """The documented command in its own process (`--trust` once unpickled fully, issue 23)."""
    markers = tmp_path / "markers"
    src = save({"state_dict": payloads(markers)["system"]}, tmp_path / "evil.pth", fmt)
    cmd = [sys.executable, "-m", "models.convert", str(src), str(tmp_path / "o.pt"), "--from", "tsm",
           "--model", "tsm", "--trust"]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: ") and str(src) in out.stderr
    assert_nothing_ran(markers)


def test_no_module_named_by_the_file_is_imported(tmp_path, monkeypatch) -> None:
    """Importing runs a module's top level: a file naming `evil_module.anything` must not import it,
    even when such a module is on sys.path (the old --trust reader imported every name)."""
    marker = tmp_path / "imported"
    (tmp_path / "evil_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Thing: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    thing = importlib.import_module("evil_module").Thing
    src = save({"state_dict": {"w": torch.ones(2)}, "obj": thing()}, tmp_path / "t.pt", "zip")
    marker.unlink()
    monkeypatch.delitem(sys.modules, "evil_module")
    loaded = safe_load(src)
    assert loaded.foreign == ["evil_module.Thing"] and not marker.exists()
    assert "evil_module" not in sys.modules
    assert torch.equal(read_state_dict(src)["w"], torch.ones(2))  # model.pretrained takes the tensors


@pytest.mark.parametrize("fmt", FORMATS)
def test_what_official_files_carry_loads_as_data(tmp_path, fmt) -> None:
    weights = collections.OrderedDict(w=torch.randn(3, 4), b=torch.arange(3))
    weights._metadata = collections.OrderedDict({"": {"version": 1}})
    obj = {
        "state_dict": weights, "param": torch.nn.Parameter(torch.ones(2)),
        "bf16": torch.ones(2, dtype=torch.bfloat16),
        "array": np.arange(4.0), "scalar": np.float64(1.5), "objects": np.array([{"a": 1}], dtype=object),
        "rng": np.random.RandomState(0).get_state(), "bytes": b"\x00\xff", "set": {1, 2},
        "counter": collections.Counter({40: 1}), "args": argparse.Namespace(lr=0.01), "size": torch.Size([2]),
    }  # fmt: skip
    loaded = safe_load(save(obj, tmp_path / "official.pth", fmt))
    got = loaded.obj
    assert loaded.foreign == ["argparse.Namespace"]  # the one name not on the allowlist
    assert torch.equal(got["state_dict"]["w"], weights["w"])
    assert got["state_dict"]._metadata == weights._metadata
    assert isinstance(got["param"], torch.nn.Parameter) and got["bf16"].dtype == torch.bfloat16
    np.testing.assert_array_equal(got["array"], obj["array"])
    assert got["scalar"] == 1.5 and got["objects"][0] == {"a": 1} and got["bytes"] == b"\x00\xff"
    np.testing.assert_array_equal(got["rng"][1], obj["rng"][1])
    assert got["set"] == {1, 2} and got["counter"] == obj["counter"] and got["size"] == torch.Size([2])
    assert isinstance(got["args"], Inert) and got["args"].state == {"lr": 0.01}


def test_torchscript_archives_and_other_files_are_refused(tmp_path) -> None:
    """torch.load hands a TorchScript archive to torch.jit.load, which runs its code: refused first."""
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    with pytest.raises(SafeLoadError, match="TorchScript archive"):
        safe_load(scripted)
    with pytest.raises(CheckpointError, match="TorchScript archive"):
        load_checkpoint(scripted)
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(SafeLoadError, match="not a PyTorch checkpoint"):
        safe_load(tmp_path / "notes.txt")


FAKE_CONFIG_SOURCE = """
class ConfigDict(dict):  # mmengine's ConfigDict is an addict.Dict: a dict subclass with this state
    def __getstate__(self):
        return self

    def __setstate__(self, state):
        self.update(state)


class History(list):
    pass
"""


def test_dict_and_list_subclasses_of_missing_packages_load_as_stand_ins(tmp_path, monkeypatch) -> None:
    """mmengine pickles a ConfigDict (a dict subclass) in `meta`: its items arrive by SETITEMS on the
    stand-in, which keeps them as data; a list subclass's by APPENDS."""
    names = ["mmengine", "mmengine.config", "mmengine.config.config"]
    packages = [types.ModuleType(n) for n in names]
    module = packages[-1]
    exec(FAKE_CONFIG_SOURCE, module.__dict__)
    with monkeypatch.context() as patch:
        for name, package in zip(names, packages, strict=True):
            patch.setitem(sys.modules, name, package)
        packages[0].config, packages[1].config = packages[1], module
        cfg = module.ConfigDict(model={"type": "Recognizer2D"}, lr=0.01)
        obj = {"meta": {"cfg": cfg, "history": module.History([1, 2])}, "state_dict": {"w": torch.ones(2)}}
        src = save(obj, tmp_path / "mm.pth", "zip")
    loaded = safe_load(src)
    meta = loaded.obj["meta"]
    assert sorted(loaded.foreign) == ["mmengine.config.config.ConfigDict", "mmengine.config.config.History"]
    assert isinstance(meta["cfg"], Inert)
    assert meta["cfg"].items == {"model": {"type": "Recognizer2D"}, "lr": 0.01}
    assert meta["history"].listitems == [1, 2]
    assert torch.equal(read_state_dict(src)["w"], torch.ones(2))
