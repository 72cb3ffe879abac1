"""prep.resize: short side, CFR, keyframes exactly every gop frames (checked with ffprobe), resumable,
sources untouched, failures reported, DST inside SRC refused."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_clip
from test_prep_probe import write_vfr_clip

from prep.common import UserError
from prep.resize import in_shard, main, temp_path

GOP = 4


def ffprobe_video(path: Path) -> dict:
    """Streams and per-frame key flags / timestamps / picture types, straight from ffprobe."""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_streams", "-show_frames", "-of", "json",
         "-show_entries", "stream=codec_type,codec_name,width,height,pix_fmt,avg_frame_rate,r_frame_rate:"
         "frame=key_frame,pict_type,pts_time,best_effort_timestamp_time", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return json.loads(out)


def tree_fingerprint(root: Path) -> dict[str, tuple[str, int]]:
    """sha1 and mtime of every file under root: proves that sources are never modified."""
    return {str(p.relative_to(root)): (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture
def source_tree(ffmpeg_available, tmp_path: Path) -> Path:
    src = tmp_path / "src"
    write_clip(src / "walk" / "a.webm", num_frames=22, width=64, height=48, codec="vp9", gop=8)
    write_clip(src / "run" / "deep" / "b.avi", num_frames=18, width=48, height=64, codec="mjpeg")  # portrait
    write_vfr_clip(src / "vfr.mkv")
    return src


@pytest.mark.parametrize("codec,ext", [("h264", ".mp4"), ("vp9", ".webm"), ("mjpeg", ".avi")])
def test_short_side_cfr_and_fixed_gop(source_tree: Path, tmp_path: Path, codec: str, ext: str) -> None:
    dst = tmp_path / "dst"
    before = tree_fingerprint(source_tree)
    argv = [str(source_tree), str(dst), "--short-side", "32", "--codec", codec, "--gop", str(GOP)]
    assert main([*argv, "--jobs", "2", "--quiet"]) == 0
    assert tree_fingerprint(source_tree) == before  # sources never touched
    expected = {"walk/a": (42, 32), "run/deep/b": (32, 42), "vfr": (42, 32)}  # 64x48 -> 42x32 (even)
    for stem, size in expected.items():
        out = dst / f"{stem}{ext}"
        info = ffprobe_video(out)
        assert [s["codec_type"] for s in info["streams"]] == ["video"]  # video only
        stream = info["streams"][0]
        assert (stream["width"], stream["height"]) == size
        assert stream["pix_fmt"] == ("yuvj420p" if codec == "mjpeg" else "yuv420p")
        assert stream["avg_frame_rate"] == "25/1"
        frames = info["frames"]
        times = [float(f.get("pts_time", f.get("best_effort_timestamp_time"))) for f in frames]
        steps = {round(b - a, 4) for a, b in zip(times[:-1], times[1:], strict=True)}
        assert steps == {0.04}, (out, steps)  # constant frame rate, also for the VFR source
        keys = [i for i, f in enumerate(frames) if f["key_frame"] == 1]
        if codec == "mjpeg":
            assert keys == list(range(len(frames)))
        else:
            assert keys == list(range(0, len(frames), GOP)), (out, keys)
            # no extra intra frames that are not keyframes (H.264: every I frame is an IDR here)
            assert [i for i, f in enumerate(frames) if f["pict_type"] == "I"] == keys
    assert len(ffprobe_video(dst / f"walk/a{ext}")["frames"]) == 22
    assert len(ffprobe_video(dst / f"vfr{ext}")["frames"]) == 25  # 1.0 s of VFR input -> 25 CFR frames
    assert (dst / "resize-report.tsv").read_text() == ""


def test_fps_option_resamples_to_a_constant_rate(source_tree: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    assert main([str(source_tree / "walk"), str(dst), "--short-side", "48", "--codec", "vp9", "--gop", "2",
                 "--fps", "10", "--jobs", "1", "--quiet"]) == 0  # fmt: skip
    info = ffprobe_video(dst / "a.webm")
    stream = info["streams"][0]
    assert (stream["width"], stream["height"], stream["avg_frame_rate"]) == (64, 48, "10/1")
    assert len(info["frames"]) == 9  # 22 frames at 25 fps = 0.88 s -> 9 frames at 10 fps
    assert [i for i, f in enumerate(info["frames"]) if f["key_frame"]] == [0, 2, 4, 6, 8]


def test_rerun_redoes_nothing_and_finishes_leftovers(source_tree: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    argv = [str(source_tree), str(dst), "--short-side", "32", "--codec", "vp9", "--gop", "4", "--quiet"]
    assert main([*argv, "--jobs", "2"]) == 0
    done = {p: p.stat().st_mtime_ns for p in dst.rglob("*.webm")}
    assert len(done) == 3
    # Simulate an interruption: one output never got renamed, a half-written temp file was left over.
    victim = dst / "run" / "deep" / "b.webm"
    victim.unlink()
    temp_path(victim).write_bytes(b"half a file")
    time.sleep(0.01)
    assert main([*argv, "--jobs", "1"]) == 0
    for path, mtime in done.items():
        if path != victim:
            assert path.stat().st_mtime_ns == mtime, f"{path} was redone"
    assert victim.is_file() and ffprobe_video(victim)["streams"][0]["height"] == 42
    assert not list(dst.rglob("*.part")), "temp files must not survive"


def test_other_options_are_refused_and_force_re_encodes(ffmpeg_available, tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    for name in ("a", "b"):
        write_clip(src / f"{name}.webm", num_frames=8, width=64, height=48)
    before = tree_fingerprint(src)
    argv = [str(src), str(dst), "--codec", "mjpeg", "--gop", "4", "--quiet", "--jobs", "1"]
    assert main([*argv, "--short-side", "32"]) == 0
    assert json.loads((dst / "resize-options.json").read_text())["short_side"] == 32
    made = {p: p.stat().st_mtime_ns for p in dst.glob("*.avi")}
    assert len(made) == 2

    with pytest.raises(UserError, match=r"made with --short-side 32 \(now 24\), --crf 3 \(now 5\).*--force"):
        main([*argv, "--short-side", "24", "--crf", "5"])
    assert {p: p.stat().st_mtime_ns for p in dst.glob("*.avi")} == made  # refused: nothing redone
    assert main([*argv, "--short-side", "32"]) == 0  # the same options: a resume, nothing redone
    assert {p: p.stat().st_mtime_ns for p in dst.glob("*.avi")} == made

    time.sleep(0.01)
    assert main([*argv, "--short-side", "24", "--force"]) == 0
    assert all(ffprobe_video(p)["streams"][0]["height"] == 24 for p in made)
    assert json.loads((dst / "resize-options.json").read_text())["short_side"] == 24
    assert tree_fingerprint(src) == before  # sources never touched
    # a --force interrupted after one file: the rerun (no --force needed) redoes the stale one only
    sidecar = dst / "resize-options.json"
    old_first = dst / "a.avi"
    os.utime(old_first, ns=(sidecar.stat().st_mtime_ns - 10**9,) * 2)  # as if left from before the --force
    kept = (dst / "b.avi").stat().st_mtime_ns
    assert main([*argv, "--short-side", "24"]) == 0
    assert old_first.stat().st_mtime_ns > sidecar.stat().st_mtime_ns  # redone
    assert (dst / "b.avi").stat().st_mtime_ns == kept

    legacy = tmp_path / "legacy"  # outputs from before the options record: refused, --force redoes them
    legacy.mkdir()
    (legacy / "a.avi").write_bytes((dst / "a.avi").read_bytes())
    with pytest.raises(UserError, match=r"holds videos but no resize-options.json"):
        main([str(src), str(legacy), "--codec", "mjpeg", "--quiet"])


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_ctrl_c_then_resume(ffmpeg_available, tmp_path: Path, jobs: str) -> None:
    """Ctrl-C (SIGINT to the process group: ffmpeg gets it too) exits 130 and blames no source in the
    report, with one ffmpeg inline or several on threads."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    for i in range(6):
        write_clip(src / f"c{i}.webm", num_frames=24, width=64, height=48, seed=i)
    cmd = [sys.executable, "-m", "prep.resize", str(src), str(dst), "--short-side", "32", "--codec", "vp9",
           "--gop", "4", "--jobs", jobs, "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(dst.glob("*.webm")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    _, err = proc.communicate(timeout=60)
    if proc.returncode != 0:  # it may have finished before the signal arrived
        assert proc.returncode == 130 and b"resume" in err and b"Traceback" not in err, err
        assert (dst / "resize-report.tsv").read_text() == "", "an interrupted encode blames no source"
    finished = {p: p.stat().st_mtime_ns for p in dst.glob("*.webm")}
    assert finished and not list(dst.glob(".*.part"))
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert sorted(p.name for p in dst.glob("*.webm")) == [f"c{i}.webm" for i in range(6)]
    assert all(p.stat().st_mtime_ns == m for p, m in finished.items())


def test_failures_are_reported_and_do_not_stop_the_run(ffmpeg_available, tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_clip(src / "ok.webm", num_frames=8, width=64, height=48)
    (src / "broken.mp4").write_bytes(b"definitely not a video" * 20)
    (src / "notes.txt").write_text("ignored: not a video file")
    assert main([str(src), str(dst), "--short-side", "32", "--codec", "vp9", "--quiet", "--jobs", "2"]) == 1
    assert (dst / "ok.webm").is_file() and not (dst / "broken.webm").exists()
    report = (dst / "resize-report.tsv").read_text().splitlines()
    assert len(report) == 1 and report[0].startswith("broken.mp4\tundecodable")


def test_refuses_dst_inside_or_equal_to_src(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for dst in (src, src / "out", tmp_path):
        with pytest.raises(UserError, match="SRC|DST"):
            main([str(src), str(dst), "--quiet"])
    with pytest.raises(UserError, match="even"):
        main([str(src), str(tmp_path / "o"), "--short-side", "33"])
    with pytest.raises(UserError, match="--shard"):
        main([str(src), str(tmp_path / "o"), "--shard", "3/2"])
    proc = subprocess.run([sys.executable, "-m", "prep.resize", str(src), str(src / "x")],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_shards_split_the_files_exactly_once() -> None:
    names = [f"class{i % 7}/video_{i}.mp4" for i in range(500)]
    owners = [[k for k in range(1, 4) if in_shard(name, (k, 3))] for name in names]
    assert all(len(o) == 1 for o in owners)
    sizes = [sum(o == [k] for o in owners) for k in range(1, 4)]
    assert min(sizes) > 120  # roughly even


def _link_tree(tmp_path: Path) -> tuple[Path, Path]:
    """SRC={a.webm, sub/b.webm, sub/c.webm} and an empty DST (the issue-23 layouts add links to it)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    for rel in ("a.webm", "sub/b.webm", "sub/c.webm"):
        write_clip(src / rel, num_frames=4, width=32, height=24)
    dst.mkdir()
    return src, dst


@pytest.mark.parametrize("layout", ["linked_folder", "linked_temp", "linked_output"])
def test_links_in_dst_never_let_a_write_reach_src(ffmpeg_available, tmp_path: Path, layout: str) -> None:
    """`ln -s SRC/sub DST/sub`, `ln -s SRC/a.webm DST/.a.webm.part` (and the output itself a link):
    refused with one line and exit status 2 before anything is written; SRC is byte-for-byte the same."""
    src, dst = _link_tree(tmp_path)
    link, target = {
        "linked_folder": (dst / "sub", src / "sub"),
        "linked_temp": (dst / ".a.webm.part", src / "a.webm"),
        "linked_output": (dst / "a.webm", src / "a.webm"),
    }[layout]
    link.symlink_to(target)
    before = tree_fingerprint(src)
    cmd = [sys.executable, "-m", "prep.resize", str(src), str(dst), "--codec", "vp9", "--short-side", "16",
           "--quiet", "--jobs", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: {link} is a symbolic link")
    assert tree_fingerprint(src) == before and sorted(p.name for p in src.rglob("*")) == [
        "a.webm", "b.webm", "c.webm", "sub"]  # fmt: skip
    assert not (dst / "resize-options.json").exists(), "refused before anything was written"


def test_temp_files_are_created_exclusively_and_never_followed(tmp_path: Path) -> None:
    """create_exclusive (the temp file ffmpeg writes through) refuses a planted link and a leftover."""
    from prep.common import create_exclusive

    victim = tmp_path / "victim.mp4"
    victim.write_bytes(b"source")
    (tmp_path / ".x.part").symlink_to(victim)
    with pytest.raises(OSError):
        create_exclusive(tmp_path / ".x.part")
    (tmp_path / ".y.part").write_bytes(b"left over")
    with pytest.raises(FileExistsError):
        create_exclusive(tmp_path / ".y.part")
    assert victim.read_bytes() == b"source"


def test_raw_elementary_streams_are_reencoded_with_fps_or_reported(ffmpeg_available, tmp_path: Path) -> None:
    """.h264/.hevc streams have no container and no timestamps: picked up, reported without --fps (naming
    the option), re-encoded 1:1 with it."""
    src = tmp_path / "src"
    src.mkdir()
    for name, codec in (("a.h264", "libx264"), ("b.hevc", "libx265")):
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i",
                        "testsrc=size=64x48:rate=25", "-frames:v", "12", "-c:v", codec, "-preset",
                        "ultrafast", str(src / name)],
                       check=True, capture_output=True)  # fmt: skip
    dst = tmp_path / "dst"
    assert main([str(src), str(dst), "--short-side", "32", "--quiet", "--jobs", "1"]) == 1
    report = dict(line.split("\t") for line in (dst / "resize-report.tsv").read_text().splitlines())
    assert set(report) == {"a.h264", "b.hevc"}
    assert all("elementary stream" in r and "--fps N" in r for r in report.values()), report
    dst2 = tmp_path / "dst2"
    assert main([str(src), str(dst2), "--short-side", "32", "--fps", "25", "--quiet", "--jobs", "1"]) == 0
    for name in ("a.mp4", "b.mp4"):
        info = ffprobe_video(dst2 / name)
        assert len(info["frames"]) == 12 and info["streams"][0]["codec_name"] == "h264"


def _children(pid: int) -> list[int]:
    """Direct child processes of `pid` (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def test_ctrl_c_that_reaches_ffmpeg_first_blames_no_source(ffmpeg_available, tmp_path: Path) -> None:
    """The race behind the issue-23 report (rc 1 and the source blamed in resize-report.tsv): ffmpeg gets
    the SIGINT and exits 255 before Python's own KeyboardInterrupt. Made deterministic here by signalling
    the ffmpeg child alone: exit status 130, an empty report, no traceback."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    for i in range(2):
        write_clip(src / f"c{i}.webm", num_frames=150, width=320, height=240, seed=i)
    cmd = [sys.executable, "-m", "prep.resize", str(src), str(dst), "--short-side", "64", "--codec", "vp9",
           "--gop", "4", "--jobs", "1", "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline, ffmpeg_pid = time.monotonic() + 60, None
    while ffmpeg_pid is None and proc.poll() is None and time.monotonic() < deadline:
        kids = [c for c in _children(proc.pid) if Path(f"/proc/{c}/comm").read_text().strip() == "ffmpeg"]
        ffmpeg_pid = kids[0] if kids else None
        time.sleep(0.01)
    assert ffmpeg_pid is not None, "no ffmpeg was seen running"
    os.kill(ffmpeg_pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err and b"interrupted" in err
    assert (dst / "resize-report.tsv").read_text() == "", "an interrupted encode blames no source"


def test_a_fifo_among_the_sources_is_reported_not_waited_on(ffmpeg_available, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_clip(src / "ok.webm", num_frames=4, width=32, height=24)
    os.mkfifo(src / "pipe.mp4")
    assert main([str(src), str(tmp_path / "dst"), "--short-side", "16", "--quiet", "--jobs", "1"]) == 1
    report = (tmp_path / "dst" / "resize-report.tsv").read_text()
    assert report.startswith("pipe.mp4\tundecodable: not a regular file"), report
