"""Bad input, case by case: prep.validate's verdict and reason, the loader's behaviour with data.skip_bad
off (an error naming the list line and the file) and on (replaced in train, left out in val/test,
counted), and prep.resize's report.

Every case is one row of a table below; docs/RELIABILITY.md ("Bad input") lists the same rows and the
tests here that prove them. The files are tiny and made once per module (VP9/H.264 clips of 16 frames,
8-frame JPEG folders). Each test runs under a timeout (`_timeout`): a hang fails the test instead of
stalling the run.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import frame_content, write_clip
from PIL import Image
from test_prep_probe import write_audio_only, write_cut_copy, write_vfr_clip, write_zero_frame_clip

from dali_pipes.listfile import ListFileError, read_list
from dali_pipes.loader import build_loader
from dali_pipes.source import ClipLoadError
from dali_pipes.video_io import decode_all, decode_frames
from engine.config import DataConfig
from prep.common import UserError
from prep.probe import probe_video
from prep.resize import main as resize_main
from prep.validate import bad_list_path
from prep.validate import main as validate_main

TIMEOUT_S = 120  # per test; a test past it fails (SIGALRM), and the whole run is ended 60 s later
FRAMES = 16  # frames of every generated clip (unless a case says otherwise)


@pytest.fixture(autouse=True)
def _timeout():
    """Fail a test that runs past TIMEOUT_S; if even that cannot interrupt it (a hang inside C code),
    faulthandler dumps every thread's stack and ends the process, so the run never hangs."""

    def expired(signum, frame):
        raise TimeoutError(f"test ran past {TIMEOUT_S} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TIMEOUT_S)
    faulthandler.dump_traceback_later(TIMEOUT_S + 60, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True, timeout=60)


def _testsrc_h264(path: Path, *, pix_fmt: str = "yuv420p", x264: str = "", frames: int = FRAMES) -> Path:
    """H.264 test pattern; `x264` adds x264 params (open GOP, B-frames)."""
    extra = ["-x264-params", x264] if x264 else []
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=25", "-frames:v", str(frames), "-c:v", "libx264",
            "-preset", "ultrafast", "-pix_fmt", pix_fmt, *extra, str(path))  # fmt: skip
    return path


# ---- video cases -------------------------------------------------------------------------------------


def _missing(path: Path, good: Path) -> None:
    pass


def _empty(path: Path, good: Path) -> None:
    path.write_bytes(b"")


def _cut_half(path: Path, good: Path) -> None:
    write_cut_copy(good, path, 0.5)


def _moov_cut(path: Path, good: Path) -> None:
    """An MP4 written without faststart (index last), cut at 60 %: the moov atom is gone."""
    full = _testsrc_h264(path.with_name("moov_full.tmp.mp4"))
    write_cut_copy(full, path, 0.6)
    full.unlink()


def _random_bytes(path: Path, good: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(6000))


def _text(path: Path, good: Path) -> None:
    path.write_text("this is a text file, not a video\n" * 40)


def _audio_only(path: Path, good: Path) -> None:
    write_audio_only(path)


def _two_video_streams(path: Path, good: Path) -> None:
    """The good clip first, then a 32x32 second video stream: every tool reads the first."""
    other = write_clip(path.with_name("second.tmp.webm"), num_frames=8, width=32, height=32, seed=9)
    _ffmpeg("-i", str(good), "-i", str(other), "-map", "0:v", "-map", "1:v", "-c", "copy", str(path))
    other.unlink()


def _rotated(path: Path, good: Path) -> None:
    """64x48 H.264 with a 90 degree display rotation (a portrait phone video)."""
    plain = _testsrc_h264(path.with_name("rot_plain.tmp.mp4"))
    _ffmpeg("-i", str(plain), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(path))
    plain.unlink()


def _ten_bit(path: Path, good: Path) -> None:
    _testsrc_h264(path, pix_fmt="yuv420p10le")


def _yuv444(path: Path, good: Path) -> None:
    _testsrc_h264(path, pix_fmt="yuv444p")


def _odd_size(path: Path, good: Path) -> None:
    write_clip(path, num_frames=FRAMES, width=65, height=49)


def _tiny(path: Path, good: Path) -> None:
    write_clip(path, num_frames=FRAMES, width=2, height=2)


def _one_frame(path: Path, good: Path) -> None:
    write_clip(path, num_frames=1, width=64, height=48)


def _vfr(path: Path, good: Path) -> None:
    write_vfr_clip(path, num_frames=20)


def _open_gop(path: Path, good: Path) -> None:
    """Open GOPs with B-frames: leading B-frames of a GOP reference the previous GOP."""
    _testsrc_h264(path, x264="open-gop=1:keyint=8:min-keyint=8:bframes=3:b-pyramid=0:scenecut=0", frames=32)


def _unicode_path(path: Path, good: Path) -> None:
    write_clip(path, num_frames=FRAMES, width=64, height=48, seed=3)


def _damaged_mid(path: Path, good: Path) -> None:
    """300 bytes scrambled in the middle of an H.264 MP4: the container is intact, the picture data not."""
    source = _testsrc_h264(path.with_name("dmg_src.tmp.mp4"), frames=32)
    data = bytearray(source.read_bytes())
    source.unlink()
    start = len(data) // 2
    data[start : start + 300] = bytes((b * 7 + 13) % 256 for b in data[start : start + 300])
    path.write_bytes(bytes(data))


def _zero_frames(path: Path, good: Path) -> None:
    write_zero_frame_clip(good, path)


def _copy(path: Path, good: Path) -> None:
    shutil.copy(good, path)


def _directory(path: Path, good: Path) -> None:
    """A folder that carries a video's name (dir.mp4): not a frame folder, not a video."""
    path.mkdir()


def _fifo(path: Path, good: Path) -> None:
    """A named pipe with a video's name: opening it for reading would block until a writer comes."""
    os.mkfifo(path)


def _raw_h264(path: Path, good: Path) -> None:
    """An H.264 elementary stream (Annex B): no container, no timestamps, whatever the file is called."""
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=25", "-frames:v", str(FRAMES), "-c:v", "libx264",
            "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-f", "h264", str(path))  # fmt: skip


def _size_change(path: Path, good: Path) -> None:
    """MKV whose H.264 stream switches from 64x48 to 96x64 at frame 8 (a re-joined recording)."""
    parts = []
    for k, size in enumerate(("64x48", "96x64")):
        part = path.with_name(f"size_part{k}.tmp.h264")
        _ffmpeg("-f", "lavfi", "-i", f"testsrc=size={size}:rate=25", "-frames:v", str(FRAMES // 2), "-c:v",
                "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(part))  # fmt: skip
        parts.append(part)
    joined = path.with_name("size_joined.tmp.h264")
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    _ffmpeg("-r", "25", "-i", str(joined), "-c", "copy", str(path))
    for p in (*parts, joined):
        p.unlink()


@dataclass(frozen=True)
class VideoCase:
    """One kind of bad (or odd) video file and what every tool must do with it."""

    name: str  # file name under the data root
    make: Callable[[Path, Path], None]  # (target, the good clip) -> writes the file
    validate: str  # the kind prep.validate reports ("" = good)
    loader: str  # "bad": ClipLoadError naming line and file (skip_bad: replaced / left out); "ok": loads
    resize: str  # "done" | "failed" | "" (no source file to convert)
    why: str = ""  # regex that validate's detail, the loader's error and resize's reason must match
    listed: int = FRAMES  # num_frames on its list line


VIDEO_CASES = [
    VideoCase("missing.webm", _missing, "missing", "bad", "", "no such file|not found"),
    VideoCase("empty.webm", _empty, "empty", "bad", "failed", "0 bytes|empty"),
    VideoCase("cut_half.webm", _cut_half, "truncated", "bad", "failed", "declares|shorter|ended prematurely"),
    VideoCase("moov_cut.mp4", _moov_cut, "truncated", "bad", "failed", "moov|cannot open"),
    VideoCase("random_bytes.webm", _random_bytes, "undecodable", "bad", "failed", "cannot open"),
    VideoCase("text.mp4", _text, "undecodable", "bad", "failed", "cannot open"),
    VideoCase("audio_only.mp4", _audio_only, "no video stream", "bad", "failed", "audio|no video stream"),
    VideoCase("damaged_mid.mp4", _damaged_mid, "undecodable", "bad", "failed", "decod|corrupt|invalid",
              listed=32),  # fmt: skip
    VideoCase("zero_frames.avi", _zero_frames, "zero frames", "bad", "failed", "no frames|no decodable"),
    VideoCase("listed_too_long.webm", _copy, "frame count differs", "bad", "done", "says 40|shorter than",
              listed=40),  # fmt: skip
    VideoCase("rotated.mp4", _rotated, "rotated", "bad", "done", "rotation 90"),
    VideoCase("vfr.mkv", _vfr, "variable frame rate", "ok", "done", "unevenly", listed=20),
    VideoCase("two_streams.mkv", _two_video_streams, "", "ok", "done"),
    VideoCase("ten_bit.mp4", _ten_bit, "", "ok", "done"),
    VideoCase("yuv444.mp4", _yuv444, "", "ok", "done"),
    VideoCase("odd_65x49.webm", _odd_size, "", "ok", "done"),
    VideoCase("tiny_2x2.webm", _tiny, "", "ok", "done"),
    VideoCase("one_frame.webm", _one_frame, "", "ok", "done", listed=1),
    VideoCase("open_gop.mp4", _open_gop, "", "ok", "done", listed=32),
    VideoCase("dir ä/clip ü é.webm", _unicode_path, "", "ok", "done"),
    VideoCase("dir.mp4", _directory, "undecodable", "bad", "", "is a directory"),
    VideoCase("fifo.mp4", _fifo, "undecodable", "bad", "", "not a regular file"),
    VideoCase("raw.h264", _raw_h264, "no timestamps", "bad", "failed", "elementary stream|no timestamp"),
    VideoCase("annexb.mp4", _raw_h264, "no timestamps", "bad", "failed", "elementary stream|no timestamp"),
    VideoCase("size_change.mkv", _size_change, "size changes", "bad", "done", "size changes midway"),
]
BAD_VIDEOS = [c for c in VIDEO_CASES if c.loader == "bad"]
VIDEO_IDS = [Path(c.name).stem.replace(" ", "_") for c in VIDEO_CASES]


def data_cfg(list_path: Path, **kw) -> DataConfig:
    """The loader on the CPU, decoding in the main process (fast to build), 4 segments, tiny crops."""
    base = dict(train_list=str(list_path), val_list=str(list_path), device="cpu", input_size=16,
                scale_size=20, num_segments=4, batch_size=2, num_threads=1, num_workers=0,
                prefetch=1)  # fmt: skip
    base.update(kw)
    return DataConfig(**base)


def run_loader(data: DataConfig, mode: str) -> tuple[list[int], object]:
    """All ids of one epoch and the (closed) loader."""
    loader = build_loader(data, mode)
    try:
        ids = [i for batch in loader for i in batch["ids"].tolist()]
    finally:
        loader.close()
    return ids, loader


def bad_report(list_path: Path, tag: str = "") -> dict[str, dict[str, str]]:
    """LIST.bad (a route check: LIST.<tag>.bad) as {entry: {kind: detail}}."""
    found: dict[str, dict[str, str]] = {}
    for line in bad_list_path(list_path, tag).read_text(encoding="utf-8").splitlines():
        where, kind, detail = line.split("\t")
        found.setdefault(where, {})[kind] = detail
    return found


@pytest.fixture(scope="module")
def videos(tmp_path_factory, ffmpeg_available) -> Path:
    """root/good.webm plus one file per VIDEO_CASES row, and root/all.txt listing them (good first)."""
    root = tmp_path_factory.mktemp("videos")
    good = write_clip(root / "good.webm", num_frames=FRAMES, width=64, height=48)
    lines = [f"good.webm {FRAMES} 0"]
    for case in VIDEO_CASES:
        target = root / case.name
        target.parent.mkdir(parents=True, exist_ok=True)
        case.make(target, good)
        lines.append(f"{case.name} {case.listed} 1")
    (root / "all.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def video_report(videos: Path) -> dict[str, dict[str, str]]:
    assert validate_main([str(videos / "all.txt"), "--jobs", "2", "--quiet"]) == 1
    return bad_report(videos / "all.txt")


@pytest.mark.parametrize("case", VIDEO_CASES, ids=VIDEO_IDS)
def test_validate_video(video_report, case: VideoCase) -> None:
    if not case.validate:
        assert case.name not in video_report, video_report.get(case.name)
        return
    assert case.validate in video_report.get(case.name, {}), (case.name, video_report.get(case.name))
    detail = video_report[case.name][case.validate]
    assert detail.startswith("line ")
    assert re.search(case.why, detail, re.I), detail


def test_validate_clean_list_keeps_exactly_the_good_videos(videos: Path, video_report) -> None:
    clean = (videos / "all.clean.txt").read_text(encoding="utf-8").splitlines()
    good = [f"good.webm {FRAMES} 0"] + [f"{c.name} {c.listed} 1" for c in VIDEO_CASES if not c.validate]
    assert clean == good


def test_validate_gpu_route_refuses_what_nvdec_cannot_decode(videos: Path) -> None:
    """--device gpu: NVDEC (through DALI) decodes 8-bit 4:2:0 only; 10-bit and 4:4:4 H.264 are refused."""
    listed = videos / "gpu.txt"
    listed.write_text(f"good.webm {FRAMES} 0\nten_bit.mp4 {FRAMES} 0\nyuv444.mp4 {FRAMES} 0\n"
                      f"odd_65x49.webm {FRAMES} 0\n")  # fmt: skip
    assert validate_main([str(listed), "--device", "gpu", "--jobs", "1", "--quiet"]) == 1
    report = bad_report(listed, "gpu")
    assert set(report) == {"ten_bit.mp4", "yuv444.mp4"}
    assert "yuv420p10le" in report["ten_bit.mp4"]["unsupported codec"]
    assert "yuv444p" in report["yuv444.mp4"]["unsupported codec"]
    assert all("8-bit 4:2:0" in r["unsupported codec"] for r in report.values())


def test_validate_gpu_route_calls_a_cut_file_cut_not_an_unknown_pixel_format(tmp_path: Path) -> None:
    """MP4 (index first) and WebM cut at 10 %: their headers give no pixel format; --device gpu judged
    that before decoding ("unknown pixel format"). Now the decode decides: truncated or damaged."""
    mp4 = tmp_path / "full.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=25", "-frames:v", "32", "-c:v", "libx264",
            "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(mp4))  # fmt: skip
    webm = write_clip(tmp_path / "full.webm", num_frames=32, width=64, height=48)
    write_cut_copy(mp4, tmp_path / "cut.mp4", 0.1)
    write_cut_copy(webm, tmp_path / "cut.webm", 0.1)
    listed = tmp_path / "cut.txt"
    listed.write_text("cut.mp4 32 0\ncut.webm 32 0\n")
    assert validate_main([str(listed), "--device", "gpu", "--jobs", "1", "--quiet"]) == 1
    report = bad_report(listed, "gpu")
    for name in ("cut.mp4", "cut.webm"):
        kinds = report[name]
        assert "unsupported codec" not in kinds and "pixel format" not in str(kinds), (name, kinds)
        found = kinds.get("truncated", kinds.get("undecodable", ""))
        assert re.search("cut short|incomplete|declares", found), kinds


@pytest.mark.parametrize("case", VIDEO_CASES, ids=VIDEO_IDS)
def test_loader_video_without_skip_bad(videos: Path, tmp_path: Path, case: VideoCase) -> None:
    """skip_bad off: a bad file stops the epoch with ClipLoadError `LIST:LINE: bad sample PATH: why`."""
    listed = tmp_path / "pair.txt"
    listed.write_text(f"good.webm {FRAMES} 0\n{case.name} {case.listed} 1\n", encoding="utf-8")
    data = data_cfg(listed, root=str(videos))
    if case.loader == "bad":
        with pytest.raises(ClipLoadError) as err:
            run_loader(data, "val")
        message = str(err.value)
        assert message.startswith(f"{listed}:2: bad sample {videos / case.name}: "), message
        assert re.search(case.why, message, re.I), message
    else:
        ids, _ = run_loader(data, "val")
        assert ids == [0, 1]


@pytest.fixture(scope="module")
def skip_list(videos: Path) -> Path:
    """Every good-enough file and every bad one (lines alternate), for the skip_bad runs."""
    lines = [f"{c.name} {c.listed} 1" for c in VIDEO_CASES]
    (videos / "skip.txt").write_text(f"good.webm {FRAMES} 0\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return videos / "skip.txt"


def test_loader_skip_bad_train_replaces_and_counts(videos: Path, skip_list: Path) -> None:
    bad_ids = {i + 1 for i, c in enumerate(VIDEO_CASES) if c.loader == "bad"}
    ids, loader = run_loader(data_cfg(skip_list, root=str(videos), skip_bad=True, batch_size=1), "train")
    assert len(ids) == len(VIDEO_CASES) + 1  # every slot filled: bad samples were replaced
    assert not bad_ids & set(ids), "a bad sample reached a batch"
    assert loader.replaced == len(bad_ids) and loader.left_out == 0 and loader.skipped == len(bad_ids)
    assert loader.state_dict()["skipped"] == len(bad_ids)


def test_loader_skip_bad_val_leaves_out_and_counts(videos: Path, skip_list: Path) -> None:
    bad_ids = {i + 1 for i, c in enumerate(VIDEO_CASES) if c.loader == "bad"}
    ids, loader = run_loader(data_cfg(skip_list, root=str(videos), skip_bad=True, batch_size=4), "val")
    assert sorted(ids) == sorted(set(range(len(VIDEO_CASES) + 1)) - bad_ids)  # each good video once
    assert loader.left_out == len(bad_ids) and loader.replaced == 0


@pytest.mark.parametrize("mode", ["val", "test"])
def test_loader_skip_bad_eval_warns_once_per_left_out_sample(videos: Path, tmp_path: Path, caplog, mode):
    """A bad val/test sample is left out and warned about once (not once per replacement tried)."""
    listed = tmp_path / "one_bad.txt"
    listed.write_text(f"good.webm {FRAMES} 0\nempty.webm {FRAMES} 1\nodd_65x49.webm {FRAMES} 1\n")
    with caplog.at_level("WARNING"):
        ids, loader = run_loader(data_cfg(listed, root=str(videos), skip_bad=True, batch_size=1), mode)
    warned = [r.getMessage() for r in caplog.records if "empty.webm" in r.getMessage()]
    assert ids == [0, 2] and loader.left_out == 1
    assert len(warned) == 1 and "(data.skip_bad: left out of the scores" in warned[0], warned


def test_loader_worker_processes_name_the_line_and_file_too(videos: Path, tmp_path: Path) -> None:
    """With DALI worker processes (num_workers > 0) the error crosses a process boundary: same message."""
    listed = tmp_path / "pair.txt"
    listed.write_text(f"good.webm {FRAMES} 0\nrotated.mp4 {FRAMES} 1\n")
    expected = rf"^{re.escape(str(listed))}:2: bad sample .*rotated.mp4: .*rotation 90"
    with pytest.raises(ClipLoadError, match=expected):
        run_loader(data_cfg(listed, root=str(videos), num_workers=1), "val")


def test_loader_dali_decoder_route_refuses_rotation_too(videos: Path, tmp_path: Path) -> None:
    """data.cpu_decoder: dali (file bytes to DALI's decoder, as on the GPU) checks the rotation first."""
    listed = tmp_path / "one.txt"
    listed.write_text(f"rotated.mp4 {FRAMES} 1\n")
    with pytest.raises(ClipLoadError, match=r"one.txt:1: bad sample .*rotated.mp4: display rotation 90"):
        run_loader(data_cfg(listed, root=str(videos), cpu_decoder="dali", batch_size=1), "val")


@pytest.mark.parametrize("mode", ["val", "test"])
def test_loader_eval_padding_is_not_counted_as_left_out(videos: Path, tmp_path: Path, mode: str) -> None:
    """3 videos in batches of 2: the padding slot re-reads line 1, which is bad; it is left out once."""
    listed = tmp_path / "pad.txt"
    listed.write_text(f"empty.webm {FRAMES} 0\ngood.webm {FRAMES} 1\nodd_65x49.webm {FRAMES} 1\n")
    ids, loader = run_loader(data_cfg(listed, root=str(videos), skip_bad=True), mode)
    assert ids == [1, 2] and loader.left_out == 1 and loader.skipped == 1


def test_loader_open_gop_frames_are_exact(videos: Path) -> None:
    """Seeking into open GOPs (leading B-frames) returns the frames a straight decode returns."""
    path = str(videos / "open_gop.mp4")
    ref = decode_all(path)
    want = np.array([0, 7, 8, 9, 15, 16, 23, 31, 5, 24])
    assert len(ref) == 32 and np.array_equal(decode_frames(path, want), ref[want])


@pytest.fixture(scope="module")
def resized(videos: Path, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """prep.resize over a tree holding every case's file (h264, short side 32): (DST, report)."""
    src = tmp_path_factory.mktemp("resize_src")
    for case in VIDEO_CASES:
        if case.resize:
            (src / case.name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(videos / case.name, src / case.name)
    dst = src.parent / (src.name + "_dst")
    argv = [str(src), str(dst), "--short-side", "32", "--gop", "4", "--jobs", "2", "--quiet"]
    assert resize_main(argv) == 1
    report = {}
    for line in (dst / "resize-report.tsv").read_text(encoding="utf-8").splitlines():
        rel, reason = line.split("\t")
        report[rel] = reason
    return dst, report


@pytest.mark.parametrize("case", [c for c in VIDEO_CASES if c.resize], ids=[i for i, c in
                         zip(VIDEO_IDS, VIDEO_CASES, strict=True) if c.resize])  # fmt: skip
def test_resize_report(resized, case: VideoCase) -> None:
    dst, report = resized
    out = dst / Path(case.name).with_suffix(".mp4")
    assert not list(dst.rglob("*.part")), "a temp file was left behind"
    if case.resize == "failed":
        assert case.name in report, report
        assert re.search(case.why, report[case.name], re.I), report[case.name]
        assert not out.exists(), "nothing may be left under the output name of a failed file"
        return
    assert case.name not in report, report.get(case.name)
    info = probe_video(out)
    assert (info.codec, info.pix_fmt, info.rotation) == ("h264", "yuv420p", 0)
    assert min(info.width, info.height) == 32 and info.width % 2 == 0 and info.height % 2 == 0
    if case.name == "rotated.mp4":  # the rotation is applied: a portrait output
        assert (info.width, info.height) == (32, 42)
    if case.name == "two_streams.mkv":  # the first video stream (64x48, 16 frames), as probe and loader read
        assert (info.width, info.height, info.num_frames) == (42, 32, FRAMES)


# ---- frame folder cases ------------------------------------------------------------------------------

FOLDER_FRAMES = 8


def _jpeg_bytes(k: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(frame_content(k, 64, 48)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _frame_gap(folder: Path) -> None:
    (folder / "00004.jpg").unlink()


def _frame_empty(folder: Path) -> None:
    (folder / "00004.jpg").write_bytes(b"")


def _frame_png(folder: Path) -> None:
    Image.fromarray(frame_content(3, 64, 48)).save(folder / "00004.jpg", format="PNG")


def _frame_truncated(folder: Path) -> None:
    data = (folder / "00004.jpg").read_bytes()
    (folder / "00004.jpg").write_bytes(data[: len(data) // 2])


def _frame_damaged(folder: Path) -> None:
    """Entropy-coded data scrambled, headers and end marker intact: decoders make garbage of it."""
    data = bytearray((folder / "00004.jpg").read_bytes())
    scan = data.find(b"\xff\xda") + 40
    rng = np.random.default_rng(1)
    start = scan + (len(data) - scan) // 3
    data[start : start + 40] = rng.integers(0, 255, 40, dtype=np.uint8).tobytes()
    (folder / "00004.jpg").write_bytes(bytes(data))


def _frame_no_image_data(folder: Path) -> None:
    """Headers and end marker intact, no image data: passes the loader's marker check, fails DALI."""
    data = (folder / "00004.jpg").read_bytes()
    (folder / "00004.jpg").write_bytes(data[: data.find(b"\xff\xda")] + b"\xff\xd9")


def _folder_empty(folder: Path) -> None:
    for image in folder.iterdir():
        image.unlink()


def _folder_missing(folder: Path) -> None:
    shutil.rmtree(folder)


@dataclass(frozen=True)
class FolderCase:
    name: str
    make: Callable[[Path], None]  # damages a folder of FOLDER_FRAMES good JPEGs
    validate: str
    loader: str  # "bad" | "ok" (the loader cannot see it: prep.validate must)
    why: str


FOLDER_CASES = [
    FolderCase("frame_gap", _frame_gap, "truncated", "bad", "missing"),
    FolderCase("frame_empty", _frame_empty, "empty", "bad", "0 bytes"),
    FolderCase("frame_png_as_jpg", _frame_png, "undecodable", "bad", "PNG|not a JPEG"),
    FolderCase("frame_truncated_jpeg", _frame_truncated, "truncated", "bad", "truncated"),
    FolderCase("frame_damaged_jpeg", _frame_damaged, "undecodable", "ok", "damaged"),
    FolderCase("frame_no_image_data", _frame_no_image_data, "undecodable", "bad", "after DALI failed|cannot"),
    FolderCase("folder_empty", _folder_empty, "zero frames", "bad", "no images|missing"),
    FolderCase("folder_missing", _folder_missing, "missing", "bad", "no such file|not found"),
]
FOLDER_IDS = [c.name for c in FOLDER_CASES]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("frames")
    jpegs = [_jpeg_bytes(k) for k in range(FOLDER_FRAMES)]
    lines = []
    for name in ["good", *FOLDER_IDS]:
        folder = root / name
        folder.mkdir()
        for k, data in enumerate(jpegs):
            (folder / f"{k + 1:05d}.jpg").write_bytes(data)
        lines.append(f"{name} {FOLDER_FRAMES} {len(lines) % 2}")
    for case in FOLDER_CASES:
        case.make(root / case.name)
    (root / "all.txt").write_text("\n".join(lines) + "\n")
    return root


def frames_cfg(list_path: Path, **kw) -> DataConfig:
    """Every frame of an 8-frame folder is sampled (8 segments), so any bad frame is read."""
    return data_cfg(list_path, source="frames", num_segments=FOLDER_FRAMES, **kw)


@pytest.fixture(scope="module")
def folder_report(folders: Path) -> dict[str, dict[str, str]]:
    assert validate_main([str(folders / "all.txt"), "--jobs", "1", "--quiet"]) == 1
    return bad_report(folders / "all.txt")


@pytest.mark.parametrize("case", FOLDER_CASES, ids=FOLDER_IDS)
def test_validate_frame_folder(folder_report, case: FolderCase) -> None:
    assert "good" not in folder_report
    assert case.validate in folder_report.get(case.name, {}), (case.name, folder_report.get(case.name))
    assert re.search(case.why, folder_report[case.name][case.validate], re.I), folder_report[case.name]


@pytest.mark.parametrize("case", FOLDER_CASES, ids=FOLDER_IDS)
def test_loader_frame_folder_without_skip_bad(folders: Path, tmp_path: Path, case: FolderCase) -> None:
    listed = tmp_path / "pair.txt"
    listed.write_text(f"good {FOLDER_FRAMES} 0\n{case.name} {FOLDER_FRAMES} 1\n")
    data = frames_cfg(listed, root=str(folders))
    if case.loader == "bad":
        with pytest.raises(ClipLoadError) as err:
            run_loader(data, "val")
        message = str(err.value)
        assert message.startswith(f"{listed}:2: bad sample {folders / case.name}: "), message
        assert re.search(case.why, message, re.I), message
    else:  # decoded into a damaged picture without an error: only prep.validate finds it
        ids, _ = run_loader(data, "val")
        assert ids == [0, 1]


def test_loader_frame_folders_skip_bad(folders: Path) -> None:
    """train: every bad folder replaced and counted; val: left out and counted."""
    bad_ids = {i + 1 for i, c in enumerate(FOLDER_CASES) if c.loader == "bad"}
    n = len(FOLDER_CASES) + 1
    ids, train = run_loader(frames_cfg(folders / "all.txt", skip_bad=True, batch_size=1), "train")
    assert len(ids) == n and not bad_ids & set(ids) and train.replaced == len(bad_ids)
    ids, val = run_loader(frames_cfg(folders / "all.txt", skip_bad=True, batch_size=3), "val")
    assert sorted(ids) == sorted(set(range(n)) - bad_ids) and val.left_out == len(bad_ids)


def test_loader_skip_bad_recovers_from_a_sample_only_dali_fails_on(folders: Path, tmp_path: Path) -> None:
    """No image data behind intact markers: DALI's decoder fails the batch (in a worker process here);
    with skip_bad the loader names the sample, marks it bad and redoes the batch with it replaced."""
    copy = shutil.copytree(folders / "good", tmp_path / "good_copy")
    listed = tmp_path / "three.txt"  # absolute paths: the list's folder is not the data root
    lines = [(folders / "good", 0), (folders / "frame_no_image_data", 1), (copy, 0)]
    listed.write_text("".join(f"{path} {FOLDER_FRAMES} {label}\n" for path, label in lines))
    data = frames_cfg(listed, skip_bad=True, batch_size=1, num_workers=1)
    ids, train = run_loader(data, "train")
    assert len(ids) == 3 and 1 not in ids and train.replaced == 1
    ids, val = run_loader(dataclasses.replace(data, batch_size=3), "val")
    assert ids == [0, 2] and val.left_out == 1


# ---- list file cases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ListCase:
    """A list file's bytes; validate's and the loader's verdict on it (the same rule in both)."""

    name: str
    content: bytes  # `{A}` / `{B}`: two good clips (16 frames)
    bad_line: int  # the line both name (0 = the list is accepted)
    why: str  # regex of the reason ("" when accepted)
    kind: str = "malformed line"
    samples: int = 0  # entries when accepted


A, B = f"a.webm {FRAMES} 0", f"b.webm {FRAMES} 1"
LIST_CASES = [
    ListCase("too_few_fields", f"{A}\na.webm 16\n".encode(), 2, "3 fields"),
    ListCase("too_many_fields", f"{A}\nb.webm 16 1 0\n".encode(), 2, "too many fields"),
    ListCase("extra_text_field", f"{A}\nb.webm 16 1 extra\n".encode(), 2, "too many fields"),
    ListCase("wrong_types", f"{A}\nb.webm sixteen 1\n".encode(), 2, "integers"),
    ListCase("negative_label", f"{A}\nb.webm 16 -1\n".encode(), 2, "integers"),
    ListCase("float_frames", f"{A}\nb.webm 16.0 1\n".encode(), 2, "integers"),
    ListCase("num_frames_zero", f"{A}\nb.webm 0 1\n".encode(), 2, ">= 1"),
    ListCase("label_out_of_range", f"{A}\nb.webm 16 5\n".encode(), 2, "out of range: there are 2 classes"),
    ListCase("duplicate", f"{A}\n{B}\n./{A}\n".encode(), 3, "already listed on line 1", "duplicate line"),
    ListCase("duplicate_through_link", f"{A}\n{B}\nlink.webm {FRAMES} 0\n".encode(), 3,
             "same file as line 1 .* through a link", "duplicate line"),  # fmt: skip
    ListCase("num_frames_huge", f"{A}\nb.webm 99999999999999999999 1\n".encode(), 2, "at most 2147483647"),
    ListCase("label_huge", f"{A}\nb.webm 16 99999999999999999999\n".encode(), 2, "at most 2147483647"),
    ListCase("nul_byte_in_path", f"{A}\nb\0.webm 16 1\n".encode(), 2, "NUL byte"),
    ListCase("not_utf8", f"{A}\n".encode() + b"b\xff.webm 16 1\n", 2, "UTF-8"),
    ListCase("utf8_bom", f"\ufeff{A}\n{B}\n".encode(), 0, "", samples=2),
    ListCase("crlf", f"{A}\r\n{B}\r\n".encode(), 0, "", samples=2),
    ListCase("comments_and_blanks", f"# clips\n\n{A}\n   # indented comment\n{B}\n\n".encode(), 0, "",
             samples=2),  # fmt: skip
    ListCase("empty_list", b"", 0, "no samples"),
    ListCase("only_comments", b"# nothing here\n\n", 0, "no samples"),
]


@pytest.fixture(scope="module")
def list_root(tmp_path_factory, ffmpeg_available) -> Path:
    root = tmp_path_factory.mktemp("lists")
    write_clip(root / "a.webm", num_frames=FRAMES, width=64, height=48)
    write_clip(root / "b.webm", num_frames=FRAMES, width=64, height=48, seed=1)
    (root / "link.webm").symlink_to("a.webm")  # the same file under another name
    (root / "classes.txt").write_text("zero\none\n")  # validate checks labels against it
    return root


@pytest.mark.parametrize("case", LIST_CASES, ids=[c.name for c in LIST_CASES])
def test_list_rules_shared_by_validate_and_loader(list_root: Path, case: ListCase) -> None:
    listed = list_root / f"{case.name}.txt"
    listed.write_bytes(case.content)
    argv = [str(listed), "--jobs", "1", "--quiet"]
    if case.bad_line:  # validate reports the line, the loader refuses the list naming the same line
        assert validate_main(argv) == 1
        report = bad_report(listed)
        assert case.kind in report[f"{listed}:{case.bad_line}"]
        assert re.search(case.why, report[f"{listed}:{case.bad_line}"][case.kind])
        good = (list_root / f"{case.name}.clean.txt").read_text()
        assert good.splitlines() == [A] + ([B] if case.name.startswith("duplicate") else [])
        if case.name == "label_out_of_range":  # the loader does not know the class count (train.py does)
            assert len(read_list(listed)) == 2
            return
        with pytest.raises(ListFileError, match=rf"^{re.escape(str(listed))}:{case.bad_line}: .*{case.why}"):
            build_loader(data_cfg(listed), "train")
    elif case.samples:  # accepted by both, with the same samples
        assert validate_main(argv) == 0
        assert (list_root / f"{case.name}.clean.txt").read_text().splitlines() == [A, B]
        loader = build_loader(data_cfg(listed), "train")
        assert [(Path(e.path).name, e.num_frames, e.label) for e in loader.source.entries] == [
            ("a.webm", FRAMES, 0), ("b.webm", FRAMES, 1)]  # fmt: skip
        loader.close()
    else:  # no samples at all: a usage error in validate (exit status 2), ListFileError in the loader
        with pytest.raises(UserError, match="no samples"):
            validate_main(argv)
        with pytest.raises(ListFileError, match="no samples"):
            build_loader(data_cfg(listed), "train")


def test_validate_empty_list_exits_2_with_one_line(list_root: Path) -> None:
    listed = list_root / "empty_cli.txt"
    listed.write_bytes(b"\n# only a comment\n")
    proc = subprocess.run([sys.executable, "-m", "prep.validate", str(listed), "--quiet"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "no samples" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_lists_writes_each_file_once_per_list(tmp_path: Path) -> None:
    """An annotation file naming a video twice: prep.lists keeps the first and reports the second, so its
    lists pass the duplicate rule of the loader and prep.validate."""
    from prep.lists import main as lists_main

    ann, frames, out = tmp_path / "ann", tmp_path / "frames", tmp_path / "lists"
    ann.mkdir()
    (ann / "something-something-v1-labels.csv").write_text("Tearing something\n")
    (ann / "something-something-v1-train.csv").write_text("11;Tearing something\n11;Tearing something\n")
    (ann / "something-something-v1-validation.csv").write_text("11;Tearing something\n")
    (frames / "11").mkdir(parents=True)
    for k in range(FOLDER_FRAMES):
        (frames / "11" / f"{k + 1:05d}.jpg").write_bytes(_jpeg_bytes(k))
    argv = ["sthv1", "--annotations", str(ann), "--frames", str(frames), "--out", str(out), "--quiet"]
    assert lists_main([*argv, "--jobs", "1"]) == 0
    assert len(read_list(out / "train.txt")) == 1 and len(read_list(out / "val.txt")) == 1
    report = (out / "lists-report.tsv").read_text()
    assert "train.csv:2" in report and "annotated again in train (kept: " in report


# ---- AV1 ---------------------------------------------------------------------------------------------


def _av1_encoder() -> str:
    """libsvtav1 first (its hierarchical mini-GOPs have the non-reference frames that the loader once lost),
    else libaom-av1 / librav1e; '' when this ffmpeg has no AV1 encoder."""
    found = subprocess.run(["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True).stdout
    return next((e for e in ("libsvtav1", "libaom-av1", "librav1e") if f" {e} " in found), "")


@pytest.fixture(scope="module")
def av1_clip(tmp_path_factory, ffmpeg_available) -> Path:
    encoder = _av1_encoder()
    if not encoder:
        pytest.skip("this ffmpeg has no AV1 encoder (libsvtav1, libaom-av1, librav1e)")
    path = tmp_path_factory.mktemp("av1") / "av1.mp4"
    speed = {"libsvtav1": ["-preset", "12"], "libaom-av1": ["-cpu-used", "8"], "librav1e": ["-speed", "10"]}
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=25", "-frames:v", "32", "-c:v", encoder,
            *speed[encoder], "-pix_fmt", "yuv420p", str(path))  # fmt: skip
    return path


def test_av1_every_frame_decodes_when_sought(av1_clip: Path) -> None:
    """Train mode asks for frames whose GOP starts with unwanted packets: FFmpeg's libdav1d wrapper reads
    skip_frame once when it opens, so it must not be opened skipping non-reference frames."""
    ref = decode_all(str(av1_clip))
    assert len(ref) == 32
    for wanted in ([3], [5], [3, 10, 20, 30], [1, 7, 13, 27], list(range(1, 32, 2))):
        assert np.array_equal(decode_frames(str(av1_clip), np.array(wanted)), ref[wanted]), wanted


def test_av1_loads_in_train_mode_and_validates_on_both_routes(av1_clip: Path, tmp_path: Path) -> None:
    listed = tmp_path / "av1.txt"
    listed.write_text(f"{av1_clip} 32 0\n{av1_clip.with_name('copy.mp4')} 32 1\n")
    shutil.copy(av1_clip, av1_clip.with_name("copy.mp4"))
    for epoch in range(3):
        loader = build_loader(data_cfg(listed, batch_size=1, num_segments=8), "train")
        loader.set_epoch(epoch)
        try:
            assert sorted(i for batch in loader for i in batch["ids"].tolist()) == [0, 1]
        finally:
            loader.close()
    assert validate_main([str(listed), "--jobs", "1", "--quiet"]) == 0
    # NVDEC takes AV1: the verdict compares the codec (av1), not the decoder's name (libdav1d)
    assert validate_main([str(listed), "--device", "gpu", "--jobs", "1", "--quiet"]) == 0


class _MeanNet(torch.nn.Module):
    """Scores a view by its mean pixel (what is tested is which videos arrive). Like the real models it
    cannot take a batch of 0 videos (reshape(0, -1) is ambiguous)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1).mean(1, keepdim=True) * self.weight


def test_skip_bad_eval_left_out_sample_is_one_accurate_line(videos: Path, tmp_path: Path, caplog) -> None:
    """A bad val sample under data.skip_bad, scored in 3 passes (validation every epoch) with a batch
    holding only it: one warning naming its line, saying "left out" (not "replaced"), and the passes
    score the good videos (an all-left-out batch is no longer a model call on 0 videos)."""
    from engine.scoring import evaluate_model

    listed = tmp_path / "val.txt"
    listed.write_text(f"good.webm {FRAMES} 0\nempty.webm {FRAMES} 1\n")
    loader = build_loader(data_cfg(listed, root=str(videos), skip_bad=True, batch_size=1), "val")
    try:
        with caplog.at_level("WARNING"):
            for epoch in range(3):
                loader.set_epoch(epoch)
                result = evaluate_model(_MeanNet(2), loader, 2)
                assert result.metrics["videos"] == 1 and result.ids.tolist() == [0]
    finally:
        loader.close()
    lines = [r.getMessage() for r in caplog.records if "empty.webm" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{listed}:2: bad sample")
    assert "left out" in lines[0] and "replaced" not in lines[0]
