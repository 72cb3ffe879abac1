"""prep.validate names every kind of bad entry, writes LIST.bad + a clean list, never touches LIST."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import write_clip
from test_prep_probe import write_audio_only, write_cut_copy, write_vfr_clip, write_zero_frame_clip

from prep.common import UserError
from prep.validate import bad_list_path, clean_list_path, main


def _bad_kinds(list_path: Path, tag: str = "") -> dict[str, set[str]]:
    kinds: dict[str, set[str]] = {}
    for line in bad_list_path(list_path, tag).read_text().splitlines():
        where, kind, _detail = line.split("\t")
        kinds.setdefault(where, set()).add(kind)
    return kinds


def _write_jpegs(folder: Path, count: int, skip: int | None = None) -> None:
    folder.mkdir(parents=True)
    for i in range(1, count + 1):
        if i == skip:
            continue
        frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 40 * i % 256, np.uint8), format="rgb24")
        with av.open(str(folder / f"{i:05d}.jpg"), "w", format="image2") as c:
            s = c.add_stream("mjpeg", rate=1)
            s.width, s.height, s.pix_fmt = 16, 16, "yuvj420p"
            c.mux(s.encode(frame))
            c.mux(s.encode())


def test_every_bad_kind_is_named(ffmpeg_available, tmp_path: Path) -> None:
    root = tmp_path / "data"
    kw = dict(width=64, height=48)
    good = write_clip(root / "good clip.webm", num_frames=20, **kw)  # a space in the name is fine
    write_clip(root / "h264.mp4", num_frames=12, codec="h264", **kw)
    (root / "empty.webm").write_bytes(b"")
    (root / "junk.mp4").write_bytes(b"\x00garbage" * 100)
    write_cut_copy(good, root / "cut.webm")
    write_audio_only(root / "audio.mp4")
    write_zero_frame_clip(good, root / "zero.avi")
    write_vfr_clip(root / "vfr.mkv")
    corrupt = bytearray(good.read_bytes())
    start = len(corrupt) // 3
    corrupt[start : start + 300] = bytes((b * 7 + 13) % 256 for b in corrupt[start : start + 300])
    (root / "corrupt.webm").write_bytes(bytes(corrupt))
    _write_jpegs(root / "frames_ok", 4)
    _write_jpegs(root / "frames_gap", 4, skip=2)
    (root / "classes.txt").write_text("a\nb\n")
    lines = [
        "good clip.webm 20 0",
        "h264.mp4 12 1",
        "missing.webm 20 0",
        "empty.webm 20 0",
        "junk.mp4 20 0",
        "cut.webm 20 0",
        "audio.mp4 20 0",
        "zero.avi 1 0",
        "good clip.webm 21 0",
        "vfr.mkv 20 0",
        "corrupt.webm 20 0",
        "frames_ok 4 1",
        "frames_gap 3 1",
        "only-two-fields 3",
        "x.webm many 0",
        "good clip.webm 20 7",
    ]
    list_path = root / "train.txt"
    list_path.write_text("\n".join(lines) + "\n")
    before = list_path.read_bytes()

    assert main([str(list_path), "--cpu-decoder", "dali", "--jobs", "2", "--quiet"]) == 1
    kinds = _bad_kinds(list_path, "dali")
    expected = {
        "h264.mp4": "unsupported codec",  # DALI's CPU decoder takes VP8/VP9/MJPEG only
        "missing.webm": "missing",
        "empty.webm": "empty",
        "junk.mp4": "undecodable",
        "cut.webm": "truncated",
        "audio.mp4": "no video stream",
        "zero.avi": "zero frames",
        "vfr.mkv": "variable frame rate",
        "corrupt.webm": "undecodable",
        "frames_gap": "truncated",
        f"{list_path}:14": "malformed line",
        f"{list_path}:15": "malformed line",
        f"{list_path}:16": "malformed line",  # label 7 with 2 classes
        f"{list_path}:9": "duplicate line",  # good clip.webm again (one rule with the loader: each file once)
    }
    for where, kind in expected.items():
        assert kind in kinds.get(where, set()), (where, kinds.get(where))
    assert "frames_ok" not in kinds
    clean = clean_list_path(list_path, "dali")
    assert clean.name == "train.dali.clean.txt" and not clean_list_path(list_path).exists()
    assert clean.read_text().splitlines() == ["good clip.webm 20 0", "frames_ok 4 1"]
    assert list_path.read_bytes() == before

    # With the PyAV CPU route (the default) H.264 is fine.
    (root / "h.txt").write_text("h264.mp4 12 1\ngood clip.webm 20 0\n")
    assert main([str(root / "h.txt"), "--jobs", "1", "--quiet"]) == 0
    assert Path(f"{root / 'h.txt'}.bad").read_text() == ""
    assert (root / "h.clean.txt").read_text() == (root / "h.txt").read_text()


def test_root_option_and_gpu_codecs(ffmpeg_available, tmp_path: Path) -> None:
    write_clip(tmp_path / "videos" / "a.avi", num_frames=8, width=64, height=48, codec="mjpeg")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "val.txt").write_text("a.avi 8 0\n")
    assert (
        main([str(lists / "val.txt"), "--root", str(tmp_path / "videos"), "--device", "gpu", "--quiet"]) == 0
    )
    assert main([str(lists / "val.txt"), "--quiet"]) == 1  # relative to the list's folder: missing
    assert _bad_kinds(lists / "val.txt") == {"a.avi": {"missing"}}


def test_user_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "prep.validate", str(tmp_path / "nope.txt")],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "nope.txt" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_frame_template_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "l.txt").write_text("")
    with pytest.raises(UserError, match="frame-template"):
        main([str(tmp_path / "l.txt"), "--frame-template", "{name}.jpg", "--quiet"])


@pytest.mark.parametrize("route", [["--cpu-decoder", "dali"], ["--device", "gpu"]], ids=["dali", "gpu"])
def test_a_route_check_never_replaces_the_default_clean_list(ffmpeg_available, tmp_path: Path, route) -> None:
    """The issue-23 case: a check of one route (`--cpu-decoder dali`) replaced the user's good
    LIST.clean.txt (which their config named) with an empty one. Route checks write route-named files."""
    write_clip(tmp_path / "a.mp4", num_frames=8, width=64, height=48, codec="h264")
    list_path = tmp_path / "train.txt"
    list_path.write_text("a.mp4 8 0\n")
    assert main([str(list_path), "--jobs", "1", "--quiet"]) == 0
    clean, bad = clean_list_path(list_path), bad_list_path(list_path)
    before = (clean.read_bytes(), bad.read_bytes(), Path(f"{clean}.index").read_bytes())
    tag = route[1]
    expected = 1 if tag == "dali" else 0  # DALI's CPU decoder takes no H.264; NVDEC does
    assert main([str(list_path), *route, "--jobs", "1", "--quiet"]) == expected
    assert (clean.read_bytes(), bad.read_bytes(), Path(f"{clean}.index").read_bytes()) == before
    routed = clean_list_path(list_path, tag)
    assert routed.name == f"train.{tag}.clean.txt"
    assert routed.read_text() == ("" if tag == "dali" else "a.mp4 8 0\n")
    assert bad_list_path(list_path, tag).name == f"train.txt.{tag}.bad"
