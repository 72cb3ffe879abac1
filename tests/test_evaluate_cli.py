"""evaluate.py end to end on tiny demo data: 2 ranks (torchrun, gloo, CPU) and 1 process agree per view."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
from dali_pipes.listfile import read_list
from engine import reports, scoring
from engine.checkpoint import checkpoint_name, save_checkpoint
from engine.config import load_config, to_dict
from engine.fileio import current_umask
from models import build_model

REPO = Path(__file__).resolve().parents[1]
CONFIG = """
data:
  val_list: {root}/val.txt
  train_list: {root}/train.txt
  device: cpu
  num_segments: 4
  input_size: 32
  scale_size: 48  # > input_size, so the 3 crops of a square clip differ
  num_threads: 1
  num_workers: 1
model: {{name: tsm, debug: true, num_classes: 3, num_segments: 4, dropout: 0.0}}
train: {{amp: fp32}}
"""


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory) -> Path:
    """3 validation videos (an odd count) and a randomly initialised debug TSM saved with its config."""
    root = tmp_path_factory.mktemp("evaldemo")
    cmd = [sys.executable, "-m", "prep.synth", str(root / "data"), "--classes", "move_left", "move_right",
           "grow", "--per-class", "1", "--val-per-class", "1", "--size", "32", "--frames", "8", "--jobs", "1",
           "--quiet"]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    (root / "cfg.yaml").write_text(CONFIG.format(root=root / "data"))
    cfg = load_config(root / "cfg.yaml")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    state = {"model": model.state_dict(), "config": to_dict(cfg)}
    return save_checkpoint(root / "run" / checkpoint_name(1, 1), state)


@pytest.mark.slow  # two torchrun launches (one scores, one is refused) and an in-process run: DALI pipelines
def test_two_ranks_score_every_video_once_and_match_one_process(demo_checkpoint, tmp_path):
    two = tmp_path / "two.npz"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "evaluate.py",
           "--checkpoint", str(demo_checkpoint), "--views", "3x2", "--out", str(two)]  # fmt: skip
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    dump = reports.load_dump(two)
    assert dump["ids"].tolist() == [0, 1, 2] and dump["labels"].tolist() == [0, 1, 2]
    assert dump["view_logits"].shape == (3, 6, 3)  # 3 crops x 2 clips, 3 classes
    assert json.loads(str(dump["meta"]))["world_size"] == 2
    assert dump["class_names"].tolist() == ["move_left", "move_right", "grow"]
    assert json.loads((tmp_path / "two.metrics.json").read_text())["videos"] == 3
    assert (tmp_path / "two.confusion.png").stat().st_size > 0
    # another view setting into the same --out: both ranks stop before scoring (no rank left waiting)
    other = [*cmd[: cmd.index("--views")], "--views", "1x1", "--out", str(two)]
    refused = subprocess.run(other, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "holds another evaluation's outputs" in refused.stderr, refused.stderr
    assert reports.load_dump(two)["view_logits"].shape == (3, 6, 3)

    # In this process (world 1): the centre crop of both clips, softmax fusion, the run folder as checkpoint
    # (newest checkpoint in it), and a stored model.pretrained that must not be loaded (it does not exist).
    one = tmp_path / "one.npz"
    assert evaluate.main(["--checkpoint", str(demo_checkpoint.parent), "--views=1x2", "--fuse", "softmax",
                          "--eval.batch_size=2", "--model.pretrained=/missing/imagenet.pth",
                          "--out", str(one)]) == 0  # fmt: skip
    single = reports.load_dump(one)
    # view = clip * crops + crop: the centre crop (1) of clips 0 and 1 is view 1 and view 4 of 3x2
    views = dump["view_logits"]
    assert not np.allclose(views[:, 0], views[:, 1]) and not np.allclose(views[:, 1], views[:, 4])
    np.testing.assert_allclose(single["view_logits"], dump["view_logits"][:, [1, 4]], rtol=1e-4, atol=1e-5)
    metrics = json.loads((tmp_path / "one.metrics.json").read_text())
    assert metrics["fuse"] == "softmax" and metrics["temporal_mode"] == "twice" and metrics["world_size"] == 1
    assert metrics["checkpoint"] == str(demo_checkpoint)
    expected = scoring.compute_metrics(
        scoring.fuse_views(single["view_logits"], "softmax"), single["labels"]
    )
    assert metrics["top1"] == pytest.approx(expected["top1"])
    assert metrics["mean_class"] == pytest.approx(expected["mean_class"])


def test_cli_errors_name_the_problem(demo_checkpoint, tmp_path, capsys):
    assert evaluate.main(["--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    bare = save_checkpoint(tmp_path / "bare.pt", {"model": {}, "meta": {}})  # like a models.convert output
    assert evaluate.main(["--checkpoint", str(bare)]) == 2
    assert "stores no config" in capsys.readouterr().err
    assert (
        evaluate.main(["--checkpoint", str(demo_checkpoint), "--views", "3x3", "--eval.temporal_mode=twice"])
        == 2
    )
    assert "'twice' gives 2 clip(s)" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", str(demo_checkpoint), "--model.name=tam"]) == 2
    assert "trained as another model: model.name 'tsm' in the checkpoint, 'tam' configured" in (
        capsys.readouterr().err
    )


def test_weight_mismatches_are_one_line(demo_checkpoint, capsys):
    argv = ["--checkpoint", str(demo_checkpoint), "--allow-config-mismatch"]
    assert evaluate.main([*argv, "--model.num_classes=5"]) == 2
    err = capsys.readouterr().err
    one_line = (r"weights do not fit .*: 2 shape mismatches \(checkpoint vs model\): \S*fc\.weight "
                r"\(3, \d+\) vs \(5, \d+\), \S*fc\.bias \(3,\) vs \(5,\)$")  # fmt: skip
    assert re.search(one_line, err.strip()), err
    assert evaluate.main([*argv, "--model.name=tam"]) == 2  # TAM has weights TSM lacks: dozens of keys
    err = capsys.readouterr().err.strip()
    assert re.search(r": \d+ missing: \S+, \S+, \S+, \.\.\. \d+ more$", err) and "\n" not in err, err


def test_mismatch_refused_unless_allowed_and_outputs_never_overwritten(demo_checkpoint, tmp_path, capsys):
    """A tsn config fits a tsm checkpoint's weights: refused unless told; outputs are named by model and
    views, and another evaluation's dump is never replaced without --overwrite."""
    ckpt = tmp_path / "run" / demo_checkpoint.name
    ckpt.parent.mkdir()
    ckpt.write_bytes(demo_checkpoint.read_bytes())
    base = ["--checkpoint", str(ckpt), "--views=1x1", "--progress-every=0"]
    assert evaluate.main([*base, "--model.name=tsn"]) == 2
    err = capsys.readouterr().err
    assert "model.name 'tsm' in the checkpoint, 'tsn' configured" in err and "--allow-config-mismatch" in err
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [ckpt.name]  # refused before writing anything

    assert evaluate.main([*base, "--model.name=tsn", "--allow-config-mismatch"]) == 0
    out = capsys.readouterr().out
    assert "evaluate: 3/3 videos (100%)" in out  # a progress line, though stdout is not a terminal
    tsn = ckpt.parent / f"eval_{ckpt.stem}_tsn_1x1_centres.npz"
    dump = reports.load_dump(tsn)
    listed = read_list(demo_checkpoint.parents[1] / "data" / "val.txt")
    assert dump["paths"].tolist() == [e.path for e in listed]  # ids 0, 1, 2: the list's videos in order
    assert all(Path(p).is_file() for p in dump["paths"])
    before = tsn.read_bytes()

    assert evaluate.main([*base, "--out", str(tsn)]) == 2  # the tsm evaluation may not replace the tsn one
    err = capsys.readouterr().err
    assert f"{tsn} holds another evaluation's outputs (model.name 'tsn' there, 'tsm' now)" in err
    assert tsn.read_bytes() == before
    assert evaluate.main([*base, "--out", str(tsn), "--overwrite"]) == 0
    assert json.loads(str(reports.load_dump(tsn)["identity"]))["model.name"] == "tsm"
    assert oct(tsn.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())


def test_a_directory_named_like_a_video_is_one_line(demo_checkpoint, tmp_path, capsys):
    """A list line naming a folder `dir.mp4`: exit status 2 and one line naming list:line and 'is a
    directory' (was a raw IsADirectoryError from the packet index)."""
    (tmp_path / "dir.mp4").mkdir()
    listed = tmp_path / "val.txt"
    listed.write_text("dir.mp4 8 0\n")
    assert evaluate.main(["--checkpoint", str(demo_checkpoint), f"--data.val_list={listed}",
                          "--data.num_workers=0", "--out", str(tmp_path / "scores.npz")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert f"{listed}:1: bad sample {tmp_path / 'dir.mp4'}: is a directory" in err, err
    assert "Traceback" not in err


def test_report_prints_the_fingerprint_and_says_when_the_list_differs(demo_checkpoint, tmp_path, capsys):
    """The scored list's dataset fingerprint follows the table; a checkpoint whose run validated on other
    data gets one line saying so (train.py stores its val fingerprint in every checkpoint)."""
    from dali_pipes.fingerprint import list_fingerprint

    state = torch.load(demo_checkpoint, weights_only=True)
    cfg = load_config(demo_checkpoint.parents[1] / "cfg.yaml")
    same = list_fingerprint(cfg.data.val_list, cfg.data, cfg.eval).as_dict()
    base = ["--views=1x1", "--progress-every=0"]
    for digest, noted in ((same["digest"], False), ("0123456789ab", True)):
        stored = {"val": {**same, "digest": digest}}
        ckpt = save_checkpoint(tmp_path / digest / "ckpt.pt", {**state, "dataset": stored})
        assert evaluate.main(["--checkpoint", str(ckpt), *base]) == 0
        out = capsys.readouterr().out
        assert f"scored: data {same['digest']}: 3 videos, 3 classes, 0 bad" in out
        assert ("differs from the one the checkpoint validated on (data 0123456789ab)" in out) == noted
