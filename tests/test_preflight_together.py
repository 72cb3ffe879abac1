"""One start reports every config error and preflight finding together (one block, rc 2), before any
loader or model is built; model.num_classes that does not fit the data's classes is a warning."""

from __future__ import annotations

import torch
from test_train_faults import _no_loader, _write_config
from test_train_step import _restore_threads, tiny_config  # noqa: F401

import train
from engine.preflight import preflight_problems


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


def test_a_class_count_that_does_not_fit_the_data_is_a_warning_among_the_findings(tmp_path):
    """The training list's class count (engine.preflight.class_count_warning) is checked in the same pass
    as the problems, and comes back as a warning, not a problem."""
    (tmp_path / "train.txt").write_text("a.webm 16 0\nb.webm 16 3\n")
    (tmp_path / "classes.txt").write_text("a\nb\nc\nd\n")
    items = {"data.train_list": str(tmp_path / "train.txt"), "train.eval_every": 0}
    cfg = tiny_config(tmp_path, **items, **{"model.num_classes": 400})
    problems, warnings = preflight_problems(cfg, False, False, ["train_list"], make_out_dir=False)
    assert problems == [] and len(warnings) == 1
    assert warnings[0].startswith(f"model.num_classes is 400 but {tmp_path / 'classes.txt'} names 4 classes")
    fits = tiny_config(tmp_path, **items, **{"model.num_classes": 4})
    assert preflight_problems(fits, False, False, ["train_list"], make_out_dir=False) == ([], [])
