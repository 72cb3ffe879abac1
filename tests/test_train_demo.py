"""train.py on real clips through the DALI loader: 2-process torchrun (gloo) and the learning proof."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prep.synth import ALL_CLASSES

REPO = Path(__file__).resolve().parents[1]


def _synth(out: Path, *args: str) -> Path:
    subprocess.run([sys.executable, "-m", "prep.synth", str(out), "--quiet", *args], cwd=REPO, check=True)
    return out


@pytest.fixture(scope="module")
def tiny_motion(tmp_path_factory, ffmpeg_available) -> Path:
    """A few synthetic motion clips (prep.synth): all 8 classes x 3 train, x 1 val, 64 px, 16 frames."""
    out = tmp_path_factory.mktemp("motion") / "demo"
    return _synth(out, "--classes", *ALL_CLASSES, "--per-class", "3", "--val-per-class", "1", "--size", "64",
                  "--frames", "16")  # fmt: skip


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_torchrun_two_processes_gloo_equal_batches(tiny_motion, tmp_path):
    """2 ranks, 23 training clips (odd: rank shards padded), batch 4: both ranks run 3 batches; every one of
    the 8 validation clips is scored exactly once; rank 0 alone writes the run directory."""
    lines = (tiny_motion / "train.txt").read_text().splitlines()[:23]
    (tiny_motion / "train23.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
        "configs/demo.yaml", f"--data.train_list={tiny_motion / 'train23.txt'}",
        f"--data.val_list={tiny_motion / 'val.txt'}", f"--data.flip_pairs={tiny_motion / 'flip_pairs.txt'}",
        "--data.batch_size=4", "--data.input_size=32", "--data.scale_size=36", "--train.epochs=1",
        "--train.log_every=1", f"--train.out_dir={out}", "--train.threads=1", "--model.num_classes=8",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in records if r["kind"] == "epoch"]
    assert epoch and epoch[0]["batches_per_rank"] == [3, 3]
    assert records[0]["provenance"]["world_size"] == 2
    val = [r for r in records if r["kind"] == "val"]
    assert val and val[0]["videos"] == 8
    assert [p.name for p in out.glob("ckpt_e*.pt")] == ["ckpt_e0001_s000000003.pt"]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory, ffmpeg_available) -> Path:
    """The `make demo` dataset: data/demo when it is built with today's prep.synth defaults, else the
    same thing in a temp dir."""
    from prep.synth import build_parser

    built = REPO / "data" / "demo"
    manifest = built / "synth.json"
    if manifest.is_file():
        defaults = vars(build_parser().parse_args([str(built)]))
        doc = json.loads(manifest.read_text())
        keys = ("classes", "per_class", "val_per_class", "size", "frames", "seed", "crf")
        if doc.get("complete") and all(doc.get("params", {}).get(k) == defaults[k] for k in keys):
            return built
    return _synth(tmp_path_factory.mktemp("demo") / "demo")


# Thresholds: every row of docs/TRAINING.md's table (seeds 0..4 x numerics) clears each by >= 3 points.
TSM_MIN, TSN_TOP1_MAX, TSN_DIRECTION = 90.0, 50.0, (30.0, 70.0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 3])
def test_learning_proof_tsm_learns_motion_tsn_stays_at_chance(demo_data, tmp_path, capsys, seed):
    """configs/demo.yaml with train.seed = data.seed = `seed`: the debug TSM reaches >= 90 % val top-1
    and >= 90 % direction (telling each class from its time-reversed twin); the same-size TSN stays at
    chance on direction (30-70 %) and so at <= 50 % top-1. Seed 0 is the demo's; seed 3 is another, so a
    recipe that only works for one seed fails CI.

    The longest tests (two trainings each, minutes): the training log goes straight to the terminal (or
    the log file) as it runs, so `make test` shows progress. The assertions are on the demo's own
    scoring of the final checkpoints, so the trainer's periodic validation is turned off here: it would
    score the same val list more times per model and change nothing that is checked."""
    import demo

    with capsys.disabled():
        print(f"\nlearning proof (seed {seed}): training TSM and TSN on {demo_data}", file=sys.stderr)
        tsm, tsn = demo.run_demo(demo_data, tmp_path, ["train.eval_every=0", f"train.seed={seed}",
                                                       f"data.seed={seed}"])  # fmt: skip
        print(f"learning proof: TSM {tsm}\nlearning proof: TSN {tsn}", file=sys.stderr)
    assert tsm["top1"] >= TSM_MIN, tsm
    assert tsm["direction"] >= TSM_MIN, tsm
    assert TSN_DIRECTION[0] <= tsn["direction"] <= TSN_DIRECTION[1], tsn
    assert tsn["top1"] <= TSN_TOP1_MAX, tsn
