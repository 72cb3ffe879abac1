"""ckpt_best.pt: picked by train.best_metric, kept through pruning, taken by evaluate.py and predict for a
run folder (which say which file they loaded), while --resume auto takes the newest. In-process on
MemoryLoader batches (seconds)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_step import MemoryLoader, _restore_threads, memory_data, tiny_config  # noqa: F401

import evaluate
import predict
import train
from engine.checkpoint import (
    BEST_NAME,
    BestTracker,
    CheckpointError,
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    mark_best,
    prune_checkpoints,
    run_checkpoint,
    save_checkpoint,
)
from engine.config import ConfigError, dump_yaml, load_config


def _save(folder: Path, epoch: int, step: int) -> Path:
    return save_checkpoint(folder / checkpoint_name(epoch, step), {"model": {"w": torch.ones(1) * step}})


def test_best_survives_pruning_and_newest_is_kept(tmp_path):
    best_src = _save(tmp_path, 1, 10)
    assert mark_best(best_src) == tmp_path / BEST_NAME
    for epoch in (2, 3, 4):
        _save(tmp_path, epoch, 10 * epoch)
        prune_checkpoints(tmp_path, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(4, 40)]  # the newest
    assert load_checkpoint(tmp_path / BEST_NAME)["model"]["w"].item() == 10  # its epoch file is gone
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_mark_best_replaces_atomically_and_copies_without_hard_links(tmp_path, monkeypatch):
    mark_best(_save(tmp_path, 1, 10))
    mark_best(_save(tmp_path, 2, 20))
    assert load_checkpoint(tmp_path / BEST_NAME)["model"]["w"].item() == 20

    def no_links(src, dst):
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    mark_best(_save(tmp_path, 3, 30))
    best = tmp_path / BEST_NAME
    assert best.stat().st_nlink == 1 and load_checkpoint(best)["model"]["w"].item() == 30


def test_run_folder_means_best_else_newest(tmp_path):
    _save(tmp_path, 1, 10)
    _save(tmp_path, 2, 20)
    path, why = run_checkpoint(tmp_path)
    assert path.name == checkpoint_name(2, 20) and "newest" in why
    mark_best(tmp_path / checkpoint_name(1, 10))
    path, why = run_checkpoint(tmp_path)
    assert path.name == BEST_NAME and "best" in why
    assert load_checkpoint(tmp_path)["model"]["w"].item() == 10
    assert run_checkpoint(tmp_path / "x.pt") == (tmp_path / "x.pt", "as given")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no ckpt_best.pt or ckpt_e"):
        run_checkpoint(tmp_path / "empty")


def test_best_tracker_modes_and_resume_state():
    up = BestTracker("top1", "max")
    assert [up.update({"top1": v}, e) for e, v in enumerate([10.0, 30.0, 30.0, 20.0], 1)] == [
        True, True, False, False,
    ]  # fmt: skip
    assert (up.value, up.epoch) == (30.0, 2)
    down = BestTracker("mean_class", "min")
    assert [down.update({"mean_class": v}, 1) for v in (5.0, 7.0, 1.0)] == [True, False, True]
    again = BestTracker("top1", "max")
    again.load_state_dict(up.state_dict())
    assert not again.update({"top1": 29.0}, 5)
    other = BestTracker("top5", "max")
    other.load_state_dict(up.state_dict())  # ranked by another metric: start afresh
    assert other.value is None


def test_best_metric_is_checked_by_name():
    with pytest.raises(ConfigError, match="train.best_metric: 'acc' is not one of top1, top5, mean_class"):
        load_config(None, ["train.best_metric=acc"])
    assert load_config(None).train.keep_ckpts == 3


def _scripted_validation(monkeypatch, top1: list[float]) -> None:
    """train.validate returns these top-1 values, epoch by epoch (the real one scores random batches)."""

    def validate(run, epoch):
        return {"val": {"top1": top1[epoch], "top5": 100.0, "mean_class": top1[epoch], "videos": 8}}

    monkeypatch.setattr(train, "validate", validate)


@pytest.mark.usefixtures("memory_data")
def test_training_keeps_the_best_records_it_and_resume_takes_the_newest(monkeypatch, tmp_path):
    _scripted_validation(monkeypatch, [10.0, 40.0, 25.0, 5.0])
    cfg = tiny_config(tmp_path, **{"train.epochs": 4, "train.keep_ckpts": 1})
    out = train.train(cfg)
    run = Path(out["out_dir"])
    assert [p.name for p in list_checkpoints(run)] == [checkpoint_name(4, 16)]
    best = load_checkpoint(run / BEST_NAME)
    assert (best["epoch"], best["step"]) == (2, 8) and best["best"]["value"] == 40.0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    bests = [(r["epoch"], r["value"], r["checkpoint"]) for r in records if r["kind"] == "best"]
    assert bests == [(1, 10.0, checkpoint_name(1, 4)), (2, 40.0, checkpoint_name(2, 8))]
    assert train.resolve_resume("auto", run).name == checkpoint_name(4, 16)

    # resumed for 2 more epochs: 30 does not beat the 40 the checkpoint remembers, 50 does
    _scripted_validation(monkeypatch, [0, 0, 0, 0, 30.0, 50.0])
    out = train.train(tiny_config(tmp_path, **{"train.epochs": 6, "train.keep_ckpts": 1}), resume="auto")
    assert load_checkpoint(run / BEST_NAME)["epoch"] == 6
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "best"] == [1, 2, 6]


@pytest.mark.usefixtures("memory_data")
def test_evaluate_and_predict_name_the_file_they_loaded(monkeypatch, tmp_path, capsys):
    _scripted_validation(monkeypatch, [50.0, 10.0])
    cfg = tiny_config(tmp_path, **{"train.epochs": 2})
    run = Path(train.train(cfg)["out_dir"])
    capsys.readouterr()
    # evaluate.py on the run folder: the best (epoch 1), named in the console and in the dump's meta
    (tmp_path / "val.txt").write_text("".join(f"v{i}.webm 16 {i % 5}\n" for i in range(8)))
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(dump_yaml(cfg))
    dump = tmp_path / "eval.npz"
    val = f"--data.val_list={tmp_path / 'val.txt'}"
    argv = [str(cfg_file), "--checkpoint", str(run), val, "--out", str(dump)]
    assert evaluate.main(argv) == 0
    assert f"checkpoint {run / BEST_NAME} (the run's best" in capsys.readouterr().out
    with np.load(dump, allow_pickle=False) as z:
        assert json.loads(str(z["meta"]))["checkpoint"] == str(run / BEST_NAME)
    # predict: the console line before any scoring (a missing video stops it after the checkpoint line)
    (tmp_path / "clip.webm").write_bytes(b"")
    predict.main([str(run), str(tmp_path / "clip.webm")])
    assert f"checkpoint {run / BEST_NAME} (the run's best" in capsys.readouterr().out
