"""prep.synth: deterministic, motion-only classes (reverse class = reversed base motion), idempotent."""

from __future__ import annotations

import hashlib
from pathlib import Path

import av
import numpy as np
import pytest

from prep.common import UserError
from prep.synth import ALL_CLASSES, REVERSE_OF, clip_rng, main, render_clip

SMALL = ["--per-class", "1", "--val-per-class", "1", "--size", "32", "--frames", "8", "--quiet"]
CLASSES = ["move_left", "move_right", "rotate_cw", "rotate_ccw", "grow"]


def decoded_hashes(root: Path) -> dict[str, str]:
    """sha1 of the decoded pixels of every clip: what determinism promises (not the encoder bytes)."""
    hashes = {}
    for path in sorted(root.rglob("*.webm")):
        with av.open(str(path)) as c:
            pixels = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
        hashes[str(path.relative_to(root))] = hashlib.sha1(pixels.tobytes()).hexdigest()
    return hashes


def test_same_seed_same_dataset(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main([str(a), "--classes", *CLASSES, *SMALL, "--jobs", "2"]) == 0
    assert main([str(b), "--classes", *CLASSES, *SMALL, "--jobs", "1"]) == 0
    assert main([str(c), "--classes", *CLASSES, *SMALL, "--seed", "1"]) == 0
    for name in ("train.txt", "val.txt", "classes.txt", "flip_pairs.txt"):
        assert (a / name).read_text() == (b / name).read_text()
    assert decoded_hashes(a) == decoded_hashes(b)
    assert set(decoded_hashes(a).values()).isdisjoint(decoded_hashes(c).values())

    assert (a / "classes.txt").read_text().splitlines() == CLASSES
    assert (a / "flip_pairs.txt").read_text() == "0 1\n2 3\n"
    train = [line.rsplit(maxsplit=2) for line in (a / "train.txt").read_text().splitlines()]
    assert train == [[f"videos/{name}/train_0000.webm", "8", str(i)] for i, name in enumerate(CLASSES)]
    assert len((a / "val.txt").read_text().splitlines()) == len(CLASSES)


@pytest.mark.parametrize("reverse", sorted(REVERSE_OF))
def test_reverse_class_is_the_base_motion_played_backwards(reverse: str) -> None:
    """Why a frame-order-blind model is at chance on each pair: identical frame distributions."""
    base = REVERSE_OF[reverse]
    forward = render_clip(base, clip_rng(3, "x", "train", 0), 48, 12)
    backward = render_clip(reverse, clip_rng(3, "x", "train", 0), 48, 12)
    np.testing.assert_array_equal(backward, forward[::-1])
    assert not np.array_equal(forward[0], forward[-1])  # something moves


def test_motion_directions() -> None:
    """The object (pixels that differ from the clip's background) moves/grows the named way."""

    def object_masks(name: str, seed: int) -> np.ndarray:
        frames = render_clip(name, clip_rng(seed, name, "train", 0), 64, 16).astype(np.int16)
        background = np.median(frames, axis=0)  # the object covers each pixel in few frames
        return np.abs(frames - background).sum(-1) > 40

    for seed in range(3):
        m = object_masks("move_right", seed)
        xs = [np.nonzero(m[t])[1].mean() for t in (0, 15)]
        assert xs[1] > xs[0] + 5
        m = object_masks("move_up", seed)
        ys = [np.nonzero(m[t])[0].mean() for t in (0, 15)]
        assert ys[1] < ys[0] - 5
        changed = np.abs(
            np.diff(render_clip("grow", clip_rng(seed, "grow", "train", 0), 64, 16).astype(int), axis=0)
        )
        changed = changed.sum(-1) > 30  # pixels that change between consecutive frames: the object's rim
        cy, cx = (c.mean() for c in np.nonzero(changed.any(0)))
        rim = [np.hypot(*(np.nonzero(changed[t]) - np.array([[cy], [cx]]))).mean() for t in (0, 14)]
        assert rim[1] > 1.3 * rim[0]


def test_rerun_is_a_no_op_and_foreign_folders_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert main([str(out), "--classes", "grow", "shrink", *SMALL]) == 0
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert main([str(out), "--classes", "grow", "shrink", *SMALL]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes
    with pytest.raises(UserError, match="other options"):
        main([str(out), "--classes", "grow", *SMALL])
    assert main([str(out), "--classes", "grow", "--replace", *SMALL]) == 0  # as make demo-data does
    assert (out / "train.txt").read_text().count("\n") == 1 and not (out / "videos" / "shrink").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    for extra in ([], ["--replace"]):
        with pytest.raises(UserError, match="not made by prep.synth"):
            main([str(tmp_path / "mine"), *SMALL, *extra])
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    with pytest.raises(UserError, match="unknown"):
        main([str(tmp_path / "x"), "--classes", "jump", *SMALL])
    assert set(ALL_CLASSES) == set(REVERSE_OF) | set(REVERSE_OF.values())


def test_a_link_planted_as_a_temp_file_is_never_written_through(tmp_path: Path) -> None:
    """`ln -s victim OUT/videos/grow/.train_0000.webm.part` before a rerun that redoes that clip: the clip
    is written to a new file, the link's target is untouched."""
    victim = tmp_path / "victim.webm"
    victim.write_bytes(b"someone's video")
    argv = [str(tmp_path / "out"), "--classes", "grow", *SMALL, "--jobs", "1"]
    assert main(argv) == 0
    folder = tmp_path / "out" / "videos" / "grow"
    (folder / "train_0000.webm").unlink()
    (tmp_path / "out" / "train.txt").unlink()  # as an interrupted run leaves it: the rerun resumes
    (folder / ".train_0000.webm.part").symlink_to(victim)
    assert main(argv) == 0
    assert victim.read_bytes() == b"someone's video"
    assert (folder / "train_0000.webm").is_file() and not (folder / "train_0000.webm").is_symlink()
    assert not (folder / ".train_0000.webm.part").exists()
