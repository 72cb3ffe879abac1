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
    assert 500 <= width <= 2400 and 400 <= height <= 2000  # above 30 classes: the pairs chart beside


@pytest.fixture
def drawn(monkeypatch):
    """The Figures the code under test saves (their axes are inspected after the PNG is written)."""
    from matplotlib.figure import Figure

    figures = []
    save = Figure.savefig

    def keep(self, *args, **kwargs):
        figures.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def test_curves_name_top_k_by_its_real_k_and_stop_at_100(tmp_path, drawn):
    run = fake_run(tmp_path / "four", epochs=3, steps_per_epoch=2)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[0] = json.dumps({"kind": "start", "step": 0, "config": {"model": {"num_classes": 4}}})
    lines = [ln.replace('"top5": 60.0', '"top5": 100.0') for ln in lines]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    plot.save_curves([run], tmp_path / "c.png")
    top1_ax, topk_ax = drawn[-1].axes[4:6]
    assert topk_ax.get_title() == "validation top-4 (k = all classes: always 100 %)"
    assert topk_ax.get_ylabel() == "top-4 %" and topk_ax.get_ylim()[1] <= 100.5
    assert top1_ax.get_ylim()[1] <= 100.5
    assert plot.top_k_name([400]) == "top-5" and plot.top_k_name([4, 400]) == "top-k (k = 4, 5)"
    assert plot.top_k_name([None]) == "top-5"  # a run without a stored config: the metric's name
    plot.save_curves([fake_run(tmp_path / "unknown", epochs=2, steps_per_epoch=2)], tmp_path / "u.png")
    assert drawn[-1].axes[5].get_title() == "validation top-5"


def test_profiler_chart_is_ordered_by_cpu_ms_per_clip(tmp_path, drawn):
    results = [
        Result("fast but costly", "route", clips=200, seconds=2.0, cpu_seconds=8.0),  # 40 CPU-ms/clip
        Result("broken", "baseline", error="skipped: decord is not importable"),
        Result("cheap", "route", clips=100, seconds=2.0, cpu_seconds=1.0),  # 10 CPU-ms/clip
        Result("middle", "route", clips=50, seconds=2.0, cpu_seconds=1.0),  # 20 CPU-ms/clip
    ]
    save_plot(results, "t", str(tmp_path / "p.png"))
    ax = drawn[-1].axes[0]
    ticks = sorted(ax.get_yticklabels(), key=lambda t: -t.get_position()[1])  # top first
    assert [t.get_text() for t in ticks] == ["cheap", "middle", "fast but costly", "broken"]
    assert "CPU-ms per clip" in ax.get_xlabel()


def test_confusion_of_400_classes_lists_the_most_confused_pairs(tmp_path, drawn):
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(400), 2)
    predicted = labels.copy()
    predicted[labels == 7] = 8  # both videos of class 7 taken for class 8
    predicted[(labels == 300) & (np.arange(len(labels)) % 2 == 0)] = 12
    scores = np.eye(400, dtype=np.float32)[predicted] + 0.01 * rng.random((len(labels), 400))
    names = [f"class {c}" for c in range(400)]
    paths = write_reports(tmp_path / "k400.npz", labels, scores, names, {"top1": 99.0}, "k400")
    assert paths[-1].name == "k400.confused_pairs.csv"
    rows = paths[-1].read_text().splitlines()
    assert rows[1:] == ["7,class 7,8,class 8,2,1.0000", "300,class 300,12,class 12,1,0.5000"]
    pairs_ax = [ax for ax in drawn[-1].axes if "most confused" in ax.get_title()]
    assert len(pairs_ax) == 1
    ticks = sorted(pairs_ax[0].get_yticklabels(), key=lambda t: -t.get_position()[1])  # top first
    assert [t.get_text() for t in ticks] == [
        "class 7 (7)\n\u2192 class 8 (8)", "class 300 (300)\n\u2192 class 12 (12)",
    ]  # fmt: skip
    width, height = png_size(paths[3])
    assert 1500 <= width <= 2400 and 900 <= height <= 1400
    small = write_reports(tmp_path / "small.npz", labels[:16] % 8, scores[:16, :8], None, {}, "8")
    assert len(small) == 4  # 30 classes or fewer: counts in the cells, no pairs table
