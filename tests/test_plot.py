"""Pictures: training curves of several runs, the profiler's bar chart and the confusion PNG are written
as valid PNGs of sane sizes, and a failure to plot at the end of training only warns."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dali_pipes.profile import Result, save_plot
from engine import plot
from engine.reports import write_reports


def png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    with Image.open(path) as image:
        image.verify()
        return image.size


def fake_run(folder: Path, epochs: int, steps_per_epoch: int, ema: bool = False) -> Path:
    """A metrics.jsonl as train.py writes it (start, train, val, epoch records) and a line cut by a crash."""
    folder.mkdir(parents=True)
    records = [{"kind": "start", "step": 0, "time": 0.0, "config": {}}]
    step = 0
    for epoch in range(1, epochs + 1):
        for _ in range(steps_per_epoch):
            step += 1
            stats = {"loss": 2 / step, "lr": min(1, step / 4) / 100, "clips_per_s": 100 + step}
            stats["data_wait"] = 0.1
            records.append({"kind": "train", "step": step, "time": step, "epoch": epoch, **stats})
        for kind in ("val", "val_ema") if ema else ("val",):
            records.append({"kind": kind, "step": step, "epoch": epoch, "top1": 10.0 * epoch,
                            "top5": 30.0 + 10 * epoch, "mean_class": 5.0, "videos": 8})  # fmt: skip
        records.append({"kind": "epoch", "step": step, "epoch": epoch})
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"kind": "train", "st'
    (folder / "metrics.jsonl").write_text(text)
    return folder


def test_curves_of_several_runs_overlaid(tmp_path, capsys):
    a = fake_run(tmp_path / "x" / "tsm", epochs=4, steps_per_epoch=5, ema=True)
    b = fake_run(tmp_path / "y" / "tsm", epochs=3, steps_per_epoch=7)
    assert plot.run_labels([a, b]) == ["x/tsm", "y/tsm"]  # same folder name: the parent tells them apart
    assert len(plot.read_metrics(a)) == 1 + 4 * (5 + 3)  # the cut line is skipped
    out = tmp_path / "both.png"
    assert plot.main([str(a), str(b), "--out", str(out)]) == 0
    assert png_size(out) == (1300, 1050)
    assert plot.main([str(a)]) == 0  # one run: RUN_DIR/curves.png
    assert png_size(a / "curves.png") == (1300, 1050)
    assert plot.main([str(tmp_path / "nothing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_a_failure_to_plot_only_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert plot.save_run_curves(tmp_path / "missing") is None
    assert "could not write" in caplog.text and not (tmp_path / "missing" / "curves.png").exists()


def test_profiler_bar_chart(tmp_path, capsys):
    results = [
        Result("DALI cpu (pyav decode)", "route", clips=80, seconds=2.0, cpu_seconds=3.0),
        Result("DALI cpu (dali decode)", "route", clips=120, seconds=2.0, cpu_seconds=2.2),
        Result("DataLoader + decord (2 workers)", "baseline", error="skipped: decord is not importable"),
    ]
    out = tmp_path / "profile.png"
    save_plot(results, "list.txt: 8 videos, uniform T=8, batch 2", str(out))
    assert f"wrote {out}" in capsys.readouterr().out
    width, height = png_size(out)
    assert width == 1000 and 250 <= height <= 400


@pytest.mark.parametrize("num_classes", [8, 30, 174])
def test_confusion_png_for_small_and_large_label_sets(tmp_path, num_classes):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(num_classes), 3)
    scores = (
        rng.random((len(labels), num_classes))
        + 3 * np.eye(num_classes)[labels] * (rng.random(len(labels)) < 0.7)[:, None]
    )
    names = [f"Pushing something from left to right {c}" for c in range(num_classes)]
    paths = write_reports(tmp_path / "eval.npz", labels, scores, names, {"top1": 70.0}, "title")
    width, height = png_size(paths[3])
    assert 500 <= width <= 2000 and 400 <= height <= 2000
