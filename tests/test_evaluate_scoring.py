"""evaluate.py without data or checkpoints: multi-view fusion, metrics, reports, dump fusion, view names."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

import evaluate
from engine import checkpoint, config, reports, scoring
from engine.config import ConfigError, EvalConfig

NUM_CLASSES = 7


class FlatNet(nn.Module):
    """A stand-in video model: a linear layer on the whole clip, so each view gets its own logits."""

    layout = "NTCHW"
    snippet_len = 1

    def __init__(self, in_features: int = 2 * 3 * 4 * 4, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def fake_loader(videos: int, views: int, batch: int = 2, seed: int = 0) -> list[dict]:
    """Batches as dali_pipes' test mode yields them: clips (N, V, T, C, H, W), labels, ids."""
    g = torch.Generator().manual_seed(seed)
    clips = torch.randn(videos, views, 2, 3, 4, 4, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (videos,), generator=g)
    ids = torch.arange(videos)
    return [
        {"clips": clips[i : i + batch], "labels": labels[i : i + batch], "ids": ids[i : i + batch]}
        for i in range(0, videos, batch)
    ]


@pytest.mark.parametrize("fuse", ["logits", "softmax"])
def test_3x2_views_fuse_to_the_mean_of_single_view_scores(fuse):
    torch.manual_seed(0)
    model = FlatNet()
    loader = fake_loader(videos=5, views=6)  # 3 crops x 2 clips, last batch short
    result = scoring.evaluate_model(model, loader, NUM_CLASSES, fuse=fuse, amp="fp32")
    assert result.view_logits.shape == (5, 6, NUM_CLASSES) and result.scores.shape == (5, NUM_CLASSES)
    assert result.ids.tolist() == [0, 1, 2, 3, 4]

    per_view = []
    for v in range(6):  # each view on its own, as a single-view (val-shaped) batch
        single = [{**b, "clips": b["clips"][:, v]} for b in loader]
        per_view.append(scoring.evaluate_model(model, single, NUM_CLASSES, fuse="logits", amp="fp32").scores)
    per_view = np.stack(per_view, axis=1)
    with torch.no_grad():
        direct = torch.stack([model(torch.cat([b["clips"][:, v] for b in loader])) for v in range(6)], 1)
    np.testing.assert_allclose(per_view, direct.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.view_logits, per_view, rtol=1e-5, atol=1e-6)

    expected = per_view if fuse == "logits" else torch.softmax(torch.from_numpy(per_view), -1).numpy()
    np.testing.assert_allclose(result.scores, expected.mean(axis=1), rtol=1e-5, atol=1e-6)
    assert result.metrics["videos"] == 5 and result.metrics["videos_per_s"] > 0


def test_channels_last_and_bf16_autocast_give_the_same_scores():
    torch.manual_seed(0)
    model = FlatNet()
    loader = fake_loader(videos=4, views=2)
    plain = scoring.evaluate_model(model, loader, NUM_CLASSES, amp="fp32", channels_last=False)
    cl = scoring.evaluate_model(model, loader, NUM_CLASSES, amp="fp32", channels_last=True)
    bf16 = scoring.evaluate_model(model, loader, NUM_CLASSES, amp="bf16", channels_last=True)
    np.testing.assert_allclose(cl.view_logits, plain.view_logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bf16.view_logits, plain.view_logits, rtol=0.05, atol=0.05)
    assert model.training  # evaluate_model restores the mode it found


def test_unsorted_and_duplicate_ids_are_scored_once_in_id_order():
    model = FlatNet()
    batches = fake_loader(videos=6, views=1, batch=3)
    batches[0]["ids"] = torch.tensor([5, 3, 4])
    batches[1]["ids"] = torch.tensor([0, 2, 3])  # id 3 again, as a padding sampler would repeat it
    result = scoring.evaluate_model(model, batches, NUM_CLASSES, amp="fp32")
    assert result.ids.tolist() == [0, 2, 3, 4, 5] and result.metrics["videos"] == 5


def test_progress_callback_sees_every_batch_and_lines_report_rate_and_eta(capsys, monkeypatch):
    calls = []
    result = scoring.evaluate_model(
        FlatNet(), fake_loader(videos=5, views=2, batch=2), NUM_CLASSES, amp="fp32",
        progress=lambda batches, videos: calls.append((batches, videos)),
    )  # fmt: skip
    assert calls == [(1, 2), (2, 4), (3, 5)] and result.metrics["videos"] == 5

    from engine import progress

    now = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    lines = progress.ProgressLines("evaluate", total=40, unit="videos", every_s=10)
    for done, t in [(4, 101.0), (8, 110.0), (12, 112.0), (40, 120.0)]:
        now[0] = t
        lines.update(done)
    out = capsys.readouterr().out.splitlines()  # nothing at 1 s or 12 s; the 10 s mark and the end
    assert out == [
        "evaluate: 8/40 videos (20%)  0.8 videos/s  elapsed 0:10  eta 0:40",
        "evaluate: 40/40 videos (100%)  2.0 videos/s  elapsed 0:20",
    ]


def test_tables_are_not_cut_at_80_columns_in_logs(capsys):
    rows = [(f"column number {i}", f"{1000 + i}.00") for i in range(10)]  # ~170 columns
    reports.print_table(rows, "a wide table")
    out = capsys.readouterr().out
    assert "…" not in out and max(map(len, out.splitlines())) > 120
    assert all(name in out and value in out for name, value in rows)


def test_wrong_output_width_and_empty_loader_are_clear_errors():
    with pytest.raises(ValueError, match=r"expected \(4, 9\).*num_classes"):
        scoring.evaluate_model(FlatNet(), fake_loader(4, 1, batch=4), 9, amp="fp32")
    with pytest.raises(ValueError, match="no videos"):
        scoring.evaluate_model(FlatNet(), [], NUM_CLASSES, amp="fp32")


def test_metrics_on_hand_made_scores():
    labels = np.array([0, 1, 2, 2, 2])
    scores = np.array(
        [
            [9, 1, 2, 3, 4, 5, 0],  # class 0 first: top-1 hit
            [9, 7, 8, 0, 0, 0, 0],  # class 1 third: top-5 hit only
            [9, 8, 0, 7, 6, 5, 4],  # class 2 last: miss
            [0, 0, 9, 0, 0, 0, 0],  # hit
            [1, 0, 5, 0, 0, 0, 0],  # hit
        ],
        dtype=np.float32,
    )
    m = scoring.compute_metrics(scores, labels)
    assert m["top1"] == pytest.approx(60.0) and m["top5"] == pytest.approx(80.0)
    assert m["mean_class"] == pytest.approx((100 + 0 + 200 / 3) / 3)  # classes 3..6 absent: not averaged
    assert m["videos"] == 5
    with pytest.raises(ValueError, match=r"label 9 is outside 0..6.*model.num_classes"):
        scoring.compute_metrics(scores, np.array([0, 1, 2, 2, 9]))


def test_reports_csv_and_png(tmp_path):
    labels = np.array([0, 0, 1, 2])
    scores = np.eye(3, dtype=np.float32)[[0, 1, 1, 0]]  # predictions 0, 1, 1, 0
    names = ["jump", "run", "swim"]
    metrics = scoring.compute_metrics(scores, labels)
    paths = reports.write_reports(tmp_path / "run.npz", labels, scores, names, metrics, "test")
    assert [p.name for p in paths] == [
        "run.metrics.json", "run.per_class.csv", "run.confusion.csv", "run.confusion.png",
    ]  # fmt: skip
    assert json.loads(paths[0].read_text())["top1"] == pytest.approx(50.0)
    rows = list(csv.reader(paths[1].open()))
    assert rows[1:] == [
        ["0", "jump", "2", "1", "50.00"],
        ["1", "run", "1", "1", "100.00"],
        ["2", "swim", "1", "0", "0.00"],
    ]
    confusion = list(csv.reader(paths[2].open()))
    assert confusion[0][1:] == names and confusion[1] == ["jump", "1", "1", "0"] and confusion[3][1] == "1"
    assert paths[3].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[3].stat().st_size > 2000
    assert not list(tmp_path.glob(".*tmp"))  # temp files renamed away


def _dump(path, ids, labels, view_logits, names=None, **arrays):
    reports.save_dump(path, np.asarray(ids), np.asarray(labels), names, view_logits=view_logits, **arrays)
    return path


@pytest.mark.parametrize("mode", ["logits", "softmax"])
def test_fusion_of_dumps_is_the_mean_of_the_dumps(tmp_path, mode):
    rng = np.random.default_rng(0)
    ids, labels = np.arange(6), rng.integers(0, 4, 6)
    a, b = rng.normal(size=(6, 3, 4)).astype(np.float32), rng.normal(size=(6, 1, 4)).astype(np.float32)
    order = rng.permutation(6)  # a dump's row order must not matter
    paths = np.array([f"videos/v{i}.webm" for i in ids])
    names = ["w", "x", "y", "z"]
    pa = _dump(tmp_path / "a.npz", ids[order], labels[order], a[order], names, paths=paths[order])
    pb = _dump(tmp_path / "b.npz", ids, labels, b)
    fused_ids, fused_labels, fused, names = reports.fuse_dumps([pa, pb], mode)
    expected = (scoring.fuse_views(a, mode) + scoring.fuse_views(b, mode)) / 2
    if mode == "softmax":
        np.testing.assert_allclose(scoring.fuse_views(a, mode), scoring.softmax(a).mean(1), rtol=1e-6)
    assert fused_ids.tolist() == ids.tolist() and fused_labels.tolist() == labels.tolist()
    np.testing.assert_allclose(fused, expected, rtol=1e-5, atol=1e-6)
    assert names == ["w", "x", "y", "z"]

    out = tmp_path / "fused.npz"
    assert evaluate.main(["--fuse", str(pa), str(pb), "--fuse-mode", mode, "--out", str(out)]) == 0
    saved = reports.load_dump(out)
    np.testing.assert_allclose(saved["scores"], expected, rtol=1e-5, atol=1e-6)
    assert saved["paths"].tolist() == paths.tolist()  # the first dump's paths, in id order like the rest
    assert (tmp_path / "fused.confusion.png").is_file() and (tmp_path / "fused.per_class.csv").is_file()
    # a fused file fuses again (with the same mode): the mean of equal inputs is the input
    _, _, again, _ = reports.fuse_dumps([out, out], mode)
    np.testing.assert_allclose(again, expected, rtol=1e-5, atol=1e-6)


def test_fusion_errors_name_the_file(tmp_path, capsys):
    pa = _dump(tmp_path / "a.npz", [0, 1, 2], [0, 1, 1], np.zeros((3, 1, 2), np.float32))
    pb = _dump(tmp_path / "b.npz", [0, 1, 3], [0, 1, 1], np.zeros((3, 1, 2), np.float32))
    pc = _dump(tmp_path / "c.npz", [0, 1, 2], [0, 0, 1], np.zeros((3, 1, 2), np.float32))
    with pytest.raises(
        reports.DumpError, match=r"b.npz: video ids differ from .*a.npz \(1 missing, e.g. \[2\]"
    ):
        reports.fuse_dumps([pa, pb], "logits")
    with pytest.raises(reports.DumpError, match=r"c.npz: labels differ .* for 1 videos \(ids \[1\]\)"):
        reports.fuse_dumps([pa, pc], "logits")
    (tmp_path / "bad.npz").write_text("not a zip")
    assert evaluate.main(["--fuse", str(pa), str(tmp_path / "bad.npz")]) == 2
    assert "bad.npz: not a readable .npz" in capsys.readouterr().err
    assert evaluate.main(["--fuse", str(pa), str(tmp_path / "missing.npz")]) == 2
    assert "missing.npz: score dump not found" in capsys.readouterr().err


def test_view_names_resolve_per_sampling():
    assert EvalConfig().resolved("uniform").temporal_mode == "centres"
    assert EvalConfig(temporal_clips=2).resolved("uniform").temporal_mode == "twice"
    assert EvalConfig(temporal_clips=4).resolved("uniform").temporal_mode == "uniform"
    assert EvalConfig(temporal_clips=10).resolved("dense").temporal_mode == "dense"
    assert EvalConfig(temporal_clips=10).resolved("clip3d").temporal_mode == "clip3d"
    assert EvalConfig(temporal_mode="uniform", temporal_clips=2).resolved("dense").temporal_mode == "uniform"
    with pytest.raises(ConfigError, match="'twice' gives 2 clip"):
        EvalConfig(temporal_mode="twice", temporal_clips=3).resolved("uniform")
    assert config.parse_views("3x10") == (3, 10)
    with pytest.raises(ConfigError, match="--views: expected CROPSxCLIPS"):
        config.parse_views("3by10")


def test_weights_load_from_model_or_ema_and_mismatches_name_the_file():
    source, target = FlatNet(), FlatNet()
    ckpt = {"model": FlatNet().state_dict(), "ema": source.state_dict()}
    checkpoint.load_model_weights(target, ckpt, "run/ckpt.pt", "ema")
    assert torch.equal(target.fc.weight, source.fc.weight)
    with pytest.raises(ConfigError, match="run/ckpt.pt: has no 'ema' weights"):
        checkpoint.load_model_weights(target, {"model": ckpt["model"], "ema": None}, "run/ckpt.pt", "ema")
    with pytest.raises(ConfigError, match="run/ckpt.pt: weights do not fit"):
        checkpoint.load_model_weights(FlatNet(num_classes=5), ckpt, "run/ckpt.pt", "model")
