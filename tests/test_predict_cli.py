"""predict.py end to end on tiny VP9 clips with a random debug TSM: a folder with a broken file, CSV and
JSON contents, a models.convert-style checkpoint, and probabilities equal to evaluate.py's softmax."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import clip_size

import evaluate
import predict
from engine import reports, scoring
from engine.checkpoint import checkpoint_name, save_checkpoint
from engine.config import load_config, to_dict
from engine.inference import collect_videos, probabilities, top_k
from models import build_model

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["move_left", "move_right", "grow"]
CONFIG = """
data:
  val_list: {root}/val.txt
  train_list: {root}/train.txt
  device: cpu
  num_segments: 4
  input_size: 32
  scale_size: 48
  num_threads: 1
  num_workers: 1
model: {{name: tsm, debug: true, num_classes: 3, num_segments: 4, dropout: 0.0}}
train: {{amp: fp32, threads: 1}}
"""


def make_setup(root: Path, size: int) -> dict:
    """3 synthetic clips (one per class, size x size), a debug TSM checkpoint with its config, the same
    weights without a config (as models.convert writes), and a folder of the clips plus one broken file."""
    cmd = [sys.executable, "-m", "prep.synth", str(root / "data"), "--classes", *CLASSES, "--per-class", "1",
           "--val-per-class", "1", "--size", str(size), "--frames", "8", "--jobs", "1",
           "--quiet"]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    (root / "cfg.yaml").write_text(CONFIG.format(root=root / "data"))
    cfg = load_config(root / "cfg.yaml")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ckpt = save_checkpoint(root / "run" / checkpoint_name(1, 1), {"model": model.state_dict(),
                                                                   "config": to_dict(cfg)})  # fmt: skip
    bare = save_checkpoint(root / "converted.pt", {"model": model.state_dict(), "meta": {"source": "test"}})
    folder = root / "videos"
    folder.mkdir()
    for name in CLASSES:
        shutil.copy(root / "data" / "videos" / name / "val_0000.webm", folder / f"{name}.webm")
    (folder / "broken.webm").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes())
    return {"root": root, "ckpt": ckpt, "bare": bare, "folder": folder, "cfg": root / "cfg.yaml"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """32x32 clips: the CPU tests."""
    return make_setup(tmp_path_factory.mktemp("predict"), 32)


@pytest.fixture(scope="module")
def nvdec_setup(tmp_path_factory) -> dict:
    """Clips NVDEC accepts (square, at least conftest.clip_size("gpu")): the gpu test."""
    return make_setup(tmp_path_factory.mktemp("predict_nvdec"), max(clip_size("gpu")))


def test_folder_with_a_broken_file_matches_evaluate(setup, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    argv = [
        str(setup["ckpt"].parent),
        str(setup["folder"]),
        "--views",
        "3x2",
        "--topk",
        "3",
        "--out",
        str(out),
    ]
    assert predict.main(argv) == 0
    printed = capsys.readouterr().out
    assert "skipped" in printed and "broken.webm" in printed and "3 of 4 video(s) scored" in printed
    for i in (1, 2, 3):  # one progress line per video (pytest's capture is not a tty)
        assert f"[{i}/3]" in printed
    rows = list(csv.DictReader(out.open()))
    broken = [r for r in rows if r["video"].endswith("broken.webm")]
    assert len(broken) == 1 and broken[0]["error"] and not broken[0]["rank"]
    by_video: dict[str, list[dict]] = {}
    for r in rows:
        if not r["error"]:
            by_video.setdefault(Path(r["video"]).stem, []).append(r)
    assert sorted(by_video) == sorted(CLASSES)
    for ranked in by_video.values():
        assert [int(r["rank"]) for r in ranked] == [1, 2, 3] and {r["frames"] for r in ranked} == {"8"}
        probs = [float(r["probability"]) for r in ranked]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5
        assert {r["class"] for r in ranked} == set(CLASSES)  # names from the data's classes.txt

    # evaluate.py on the validation list (the same clips), same views: its softmax is predict's probability
    dump_path = tmp_path / "eval.npz"
    assert evaluate.main(["--checkpoint", str(setup["ckpt"]), "--views", "3x2", "--out", str(dump_path)]) == 0
    dump = reports.load_dump(dump_path)
    softmax = scoring.softmax(scoring.fuse_views(dump["view_logits"], "logits"))
    for label, name in enumerate(CLASSES):
        row = int(np.flatnonzero(dump["labels"] == label)[0])
        got = {int(r["class_id"]): float(r["probability"]) for r in by_video[name]}
        np.testing.assert_allclose([got[c] for c in range(3)], softmax[row], atol=2e-6)


def test_converted_checkpoint_with_config_classes_and_list_to_json(setup, tmp_path):
    classes = tmp_path / "names.txt"
    classes.write_text("left\nright\ngrowing\n")
    listing = tmp_path / "videos.txt"
    listing.write_text("grow.webm 8 2\n# a comment\nmove_left.webm\n")
    out = tmp_path / "preds.json"
    argv = [str(setup["bare"]), str(listing), "--root", str(setup["folder"]), "--config", str(setup["cfg"]),
            "--classes", str(classes), "--topk", "2", "--out", str(out), "--eval.fuse=softmax"]  # fmt: skip
    assert predict.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["views"] == "1x1" and doc["fuse"] == "softmax" and doc["failed"] == []
    assert [Path(v["video"]).name for v in doc["videos"]] == ["grow.webm", "move_left.webm"]
    for video in doc["videos"]:
        assert video["frames"] == 8 and len(video["topk"]) == 2
        assert all(t["class"] == ["left", "right", "growing"][t["class_id"]] for t in video["topk"])
        probs = [t["probability"] for t in video["topk"]]
        assert probs[0] >= probs[1] > 0 and sum(probs) < 1


def test_errors_and_nothing_readable(setup, tmp_path, capsys):
    assert predict.main([str(setup["bare"]), str(setup["folder"])]) == 2
    assert "stores no config" in capsys.readouterr().err
    assert predict.main([str(setup["ckpt"]), str(setup["folder"]), "--out", str(tmp_path / "p.txt")]) == 2
    assert "must end in .csv or .json" in capsys.readouterr().err
    assert predict.main([str(setup["ckpt"]), str(tmp_path / "missing.webm")]) == 2
    assert "no such video, folder or list file" in capsys.readouterr().err
    bad = tmp_path / "names.txt"
    bad.write_text("a\nb\n")
    assert predict.main([str(setup["ckpt"]), str(setup["folder"]), "--classes", str(bad)]) == 2
    assert "has 2 names, the model 3 classes" in capsys.readouterr().err
    only_broken = tmp_path / "only"
    only_broken.mkdir()
    shutil.copy(setup["folder"] / "broken.webm", only_broken / "broken.webm")
    out = tmp_path / "none.csv"
    assert predict.main([str(setup["ckpt"]), str(only_broken), "--out", str(out)]) == 2
    assert "0 of 1 video(s) scored" in capsys.readouterr().out
    assert "undecodable" in list(csv.DictReader(out.open()))[0]["error"]


def test_helpers(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/b/z.mp4", "a/y.webm", "x.MKV", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in collect_videos(tmp_path)] == [
        "a/b/z.mp4",
        "a/y.webm",
        "x.MKV",
    ]
    logits = np.array([[2.0, 0.0, 1.0]])
    probs = probabilities(logits, "logits")[0]
    assert probs.sum() == pytest.approx(1.0)
    assert [c for c, _, _ in top_k(probs, None, 5)] == [0, 2, 1]
    assert top_k(probs, ["a", "b", "c"], 1)[0][1] == "a"


def test_a_video_the_decoder_fails_on_is_skipped(setup, tmp_path, monkeypatch, capsys):
    """A file that probes well but fails in the test pipeline (data.skip_bad drops it; the forked DALI
    worker inherits the patched decoder)."""
    import dali_pipes.source as source
    from dali_pipes.video_io import VideoReadError

    real = source.decode_frames

    def failing(path, indices, index=None, **options):
        if "grow" in str(path):
            raise VideoReadError(f"{path}: simulated decoder failure")
        return real(path, indices, index, **options)

    monkeypatch.setattr(source, "decode_frames", failing)
    out = tmp_path / "preds.json"
    assert predict.main([str(setup["ckpt"]), str(setup["folder"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 of 4 video(s) scored, 2 skipped" in printed
    doc = json.loads(out.read_text())
    assert sorted(Path(v["video"]).name for v in doc["videos"]) == ["move_left.webm", "move_right.webm"]
    failed = {Path(f["video"]).name: f["error"] for f in doc["failed"]}
    assert "undecodable" in failed["broken.webm"] and "test pipeline" in failed["grow.webm"]

    def always(path, indices, index=None, **options):
        raise VideoReadError(f"{path}: simulated decoder failure")

    monkeypatch.setattr(source, "decode_frames", always)
    assert predict.main([str(setup["ckpt"]), str(setup["folder"])]) == 2
    printed = capsys.readouterr().out
    assert "0 of 4 video(s) scored" in printed and "scoring failed" in printed


@pytest.mark.gpu
def test_gpu_route_predicts_as_the_cpu_route(nvdec_setup, tmp_path):
    """data.device gpu (NVDEC, model on CUDA) gives the CPU route's top-1 and close probabilities."""
    results = {}
    for device in ("cpu", "gpu"):
        out = tmp_path / f"{device}.json"
        argv = [
            str(nvdec_setup["ckpt"]),
            str(nvdec_setup["folder"]),
            "--topk",
            "3",
            "--out",
            str(out),
            f"--data.device={device}",
        ]
        assert predict.main(argv) == 0
        doc = json.loads(out.read_text())
        assert doc["device"] == ("cuda" if device == "gpu" else "cpu")
        results[device] = {Path(v["video"]).name: v["topk"] for v in doc["videos"]}
    assert sorted(results["gpu"]) == sorted(results["cpu"]) == [f"{c}.webm" for c in sorted(CLASSES)]
    for name, cpu_topk in results["cpu"].items():
        gpu = {t["class_id"]: t["probability"] for t in results["gpu"][name]}
        cpu = {t["class_id"]: t["probability"] for t in cpu_topk}
        np.testing.assert_allclose([gpu[c] for c in range(3)], [cpu[c] for c in range(3)], atol=0.02)


def test_predictor_api_matches_the_command(setup, tmp_path):
    """engine.inference.Predictor: one model load, then top-k per video, the command's numbers; the run
    folder resolves as in the command (no ckpt_best.pt here: the newest), named in --out's meta."""
    from engine.inference import Predictor

    out = tmp_path / "p.json"
    video = setup["folder"] / "grow.webm"
    argv = [str(setup["ckpt"].parent), str(video), "--views", "3x2", "--topk", "3", "--out", str(out)]
    assert predict.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["checkpoint"] == str(setup["ckpt"])
    said: list[str] = []
    p = Predictor(setup["ckpt"].parent, views="3x2", topk=3, say=said.append)
    got = p(video)
    expected = doc["videos"][0]["topk"]
    assert [(c, n) for c, n, _ in got] == [(t["class_id"], t["class"]) for t in expected]
    np.testing.assert_allclose([x for _, _, x in got], [t["probability"] for t in expected], atol=1e-6)
    assert said[0] == f"checkpoint {setup['ckpt']} (the run's newest (no ckpt_best.pt))"
    results = p.predict([video, setup["folder"] / "broken.webm"])
    assert results[0].topk == got and results[1].error and not results[1].topk
    with pytest.raises(ValueError, match="broken.webm"):
        p(setup["folder"] / "broken.webm")


def test_a_symlinked_duplicate_and_a_rotated_clip_are_scored(setup, tmp_path, capsys):
    """M = {a, b, link -> a, rotated}: every file is scored ("0 of 3 scored" before: the temporary list
    held a twice); the link gets a's scores under its own name; the rotated clip is turned upright on the
    PyAV route (as FFmpeg's autorotate shows it) and scored, with no warning repeated."""
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(setup["folder"] / "grow.webm", folder / "a.webm")
    shutil.copy(setup["folder"] / "move_left.webm", folder / "b.webm")
    (folder / "link.webm").symlink_to(folder / "a.webm")
    plain = tmp_path / "plain.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(folder / "b.webm"), "-c:v", "libx264",
                    "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(plain)], check=True)  # fmt: skip
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(plain), "-c", "copy", "-metadata:s:v:0",
                    "rotate=90", str(folder / "rotated.mp4")], check=True)  # fmt: skip
    out = tmp_path / "p.json"
    assert predict.main([str(setup["ckpt"]), str(folder), "--out", str(out), "--topk", "3"]) == 0
    printed = capsys.readouterr()
    assert "4 of 4 video(s) scored" in printed.out, printed.out
    assert printed.err.count("rotation") <= 1 and printed.out.count("rotation") <= 1
    rows = {Path(v["video"]).name: v["topk"] for v in json.loads(out.read_text())["videos"]}
    assert set(rows) == {"a.webm", "b.webm", "link.webm", "rotated.mp4"}
    assert rows["link.webm"] == rows["a.webm"]


def test_rotation_is_applied_as_ffmpeg_shows_it(tmp_path):
    """decode_frames(rotate=True) returns what FFmpeg's autorotate returns, for 90, 180 and 270."""
    from dali_pipes.video_io import decode_frames

    plain = tmp_path / "plain.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=25",
                    "-frames:v", "2", "-c:v", "libx264", "-preset", "ultrafast", "-qp", "0", "-pix_fmt",
                    "yuv444p", str(plain)], check=True)  # fmt: skip
    for degrees, shape in ((90, (64, 48)), (180, (48, 64)), (270, (64, 48))):
        rotated = tmp_path / f"r{degrees}.mp4"
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(plain), "-c", "copy",
                        "-metadata:s:v:0", f"rotate={degrees}", str(rotated)], check=True)  # fmt: skip
        shown = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(rotated), "-frames:v", "1",
                                "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True,
                               check=True).stdout  # fmt: skip
        ours = decode_frames(str(rotated), np.array([0]), rotate=True)[0]
        assert ours.shape[:2] == shape
        assert np.array_equal(ours, np.frombuffer(shown, np.uint8).reshape(ours.shape)), degrees


def test_timeline_of_a_long_video(setup, tmp_path, capsys):
    """--timeline: windows of --window frames at most --stride apart through the test pipeline; each
    window's probabilities are the softmax of its own logits, so the mean of the windows' logits is what
    predict gives for the same dense views; a PNG and a per-window CSV."""
    from engine.inference import Predictor, score_timeline, timeline_views

    cmd = [sys.executable, "-m", "prep.synth", str(tmp_path / "long"), "--classes", "grow", "--per-class",
           "1", "--val-per-class", "1", "--size", "32", "--frames", "40", "--jobs", "1", "--quiet",
           ]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    video = tmp_path / "long" / "videos" / "grow" / "val_0000.webm"
    png, table = tmp_path / "t.png", tmp_path / "t.csv"
    argv = [str(setup["ckpt"]), str(video), "--timeline", str(png), "--window", "16", "--stride", "8",
            "--out", str(table), "--topk", "3"]  # fmt: skip
    assert predict.main(argv) == 0
    printed = capsys.readouterr().out
    assert timeline_views(40, 16, 8).temporal_clips == 4 and "window 3 frames 24-" in printed
    rows = list(csv.DictReader(table.open()))
    assert [int(r["window"]) for r in rows] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [int(r["start_frame"]) for r in rows[::3]] == [0, 8, 16, 24]
    assert png_size_ok(png)

    p = Predictor(setup["ckpt"], topk=3)
    windows, probs = score_timeline(p, video, 16, 8)
    assert probs.shape == (4, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert not np.allclose(probs[0], probs[3])  # the windows see different frames
    dense = Predictor(setup["ckpt"], topk=3, overrides=[
        "--data.sampling=dense", "--data.dense_window=16", "--eval.temporal_mode=dense",
        "--eval.temporal_clips=4", "--eval.spatial_crops=1"])  # fmt: skip
    fused = scoring.softmax(np.log(probs).mean(axis=0, keepdims=True))[0]  # log-softmax differs by a constant
    got = {c: pr for c, _, pr in dense(video)}
    np.testing.assert_allclose([got[c] for c in range(3)], fused, atol=2e-5)
    assert predict.main([str(setup["ckpt"]), str(setup["folder"]), "--timeline", str(png)]) == 2
    assert "must be one video file" in capsys.readouterr().err


def test_timeline_render_draws_the_labels_on_every_frame(setup, tmp_path, capsys):
    """--render OUT.mp4: as many frames as the source, the labels drawn where the source has none (the top
    left box), written atomically (no temp file left); each frame is labelled by its nearest window."""
    import av

    from engine.inference import Window, frame_ranges

    video = setup["folder"] / "grow.webm"  # 8 frames
    out = tmp_path / "labelled.mp4"
    argv = [str(setup["ckpt"]), str(video), "--timeline", str(tmp_path / "t.png"), "--window", "4",
            "--stride", "2", "--render", str(out)]  # fmt: skip
    assert predict.main(argv) == 0, capsys.readouterr().err
    assert f"wrote {out}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labelled.mp4", "t.png"]
    with av.open(str(video)) as a, av.open(str(out)) as b:
        src = [f.to_ndarray(format="rgb24").astype(int) for f in a.decode(video=0)]
        got = [f.to_ndarray(format="rgb24").astype(int) for f in b.decode(video=0)]
    assert len(got) == len(src) == 8
    corner = (slice(8, 14), slice(8, 20))  # inside the label box
    assert all(abs(g[corner] - s[corner]).mean() > 20 for g, s in zip(got, src, strict=True))
    spans = [Window(0, 3, []), Window(2, 5, []), Window(4, 7, [])]
    assert frame_ranges(spans, 8) == [(0, 2), (3, 4), (5, 7)]
    assert predict.main([str(setup["ckpt"]), str(video), "--render", str(out)]) == 2
    assert "--render goes with --timeline" in capsys.readouterr().err


def png_size_ok(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as image:
        return image.size == (1200, 500)
