"""One start reports every config error and preflight finding together (one block, rc 2), before any
loader or model is built; model.num_classes that does not fit the data's classes is a warning."""

from __future__ import annotations

import pytest
import torch
from test_train_faults import _no_loader, _write_config
from test_train_step import _restore_threads, tiny_config  # noqa: F401

import train
from engine.preflight import check_num_classes


def test_config_errors_and_preflight_findings_in_one_block(monkeypatch, tmp_path, capsys):
    _no_loader(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "train.txt").write_text("a.webm 16 0\nb.webm 16 9\n")
    cfg = _write_config(tmp_path, **{"data.train_list": str(tmp_path / "train.txt"), "train.eval_every": 0})
    argv = [cfg, "--optim.lrr=1", "--data.device=gpu", "--model.pretrained=/nowhere/r50.pth"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0] == "error: 4 problems:"
    assert lines[1].startswith("  command line: --optim.lrr=1: unknown key 'optim.lrr'")
    assert set(lines[2:]) == {
        "  data.device: 'gpu' but this machine has no CUDA device; pass --data.device=cpu",
        "  model.pretrained: /nowhere/r50.pth not found",
        f"  {tmp_path / 'train.txt'}:2: label 9 is outside [0, 5) (model.num_classes is 5)",
    }


def test_preflight_alone_collects_every_finding(monkeypatch, tmp_path, capsys):
    _no_loader(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "blocker").write_text("")
    cfg = _write_config(tmp_path, **{
        "data.train_list": str(tmp_path / "missing.txt"), "train.eval_every": 0, "data.device": "gpu",
        "train.out_dir": str(tmp_path / "blocker"),
    })  # fmt: skip
    assert train.main([cfg]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "error: 3 preflight problems:" and len(lines) == 4
    assert any("missing.txt" in line for line in lines) and any("train.out_dir" in line for line in lines)


@pytest.mark.parametrize("with_classes_txt", [True, False])
def test_num_classes_that_does_not_fit_the_data_is_a_warning(tmp_path, with_classes_txt):
    (tmp_path / "train.txt").write_text("a.webm 16 0\nb.webm 16 3\n")
    if with_classes_txt:
        (tmp_path / "classes.txt").write_text("a\nb\nc\nd\n")
    from dali_pipes.listfile import read_list

    entries = {"t": read_list(tmp_path / "train.txt")}
    cfg = tiny_config(tmp_path, **{"data.train_list": str(tmp_path / "train.txt"), "model.num_classes": 400})
    warning = check_num_classes(cfg, entries)
    if with_classes_txt:
        assert warning == f"model.num_classes is 400 but {tmp_path / 'classes.txt'} names 4 classes"
    else:
        assert warning == (
            "model.num_classes is 400 but the lists use labels 0..3 (4 classes; no classes.txt found)"
        )
    fits = tiny_config(tmp_path, **{"data.train_list": str(tmp_path / "train.txt"), "model.num_classes": 4})
    assert check_num_classes(fits, entries) == ""
