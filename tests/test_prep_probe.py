"""prep.probe: counted frames (not the header's estimate), stream facts, VFR detection, clear error kinds.

Also home of the small broken-file makers that test_prep_validate reuses.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import frame_content

from prep.probe import EMPTY, MISSING, NO_VIDEO, TRUNCATED, UNDECODABLE, ProbeError, count_images, probe_video


def _ffmpeg(*args: str, stdin: bytes | None = None) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], input=stdin, check=True)


def write_vfr_clip(path: Path, num_frames: int = 20) -> Path:
    """Frames 0-9 at 25 fps, then a 0.2 s gap: unevenly spaced timestamps (variable frame rate)."""
    frames = np.stack([frame_content(i, 64, 48) for i in range(num_frames)])
    _ffmpeg("-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "64x48", "-r", "25", "-i", "-",
            "-vf", "setpts='if(gte(N,10),N+5,N)/25/TB'", "-fps_mode", "passthrough",
            "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", str(path),
            stdin=frames.tobytes())  # fmt: skip
    return path


def write_audio_only(path: Path) -> Path:
    _ffmpeg("-f", "lavfi", "-i", "sine=duration=0.3", "-c:a", "aac", str(path))
    return path


def write_zero_frame_clip(source: Path, path: Path) -> Path:
    """An AVI with a VP9 video stream but not a single packet."""
    _ffmpeg("-i", str(source), "-c", "copy", "-frames:v", "0", str(path))
    return path


def write_cut_copy(source: Path, path: Path, fraction: float = 0.6) -> Path:
    """The first `fraction` of a file's bytes: what an interrupted download leaves."""
    data = source.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def decoded_count(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


@pytest.mark.parametrize("codec,ext", [("vp9", "webm"), ("mjpeg", "avi"), ("h264", "mp4")])
def test_probe_counts_frames_and_reads_stream_facts(make_clip, codec: str, ext: str) -> None:
    clip = make_clip(f"c.{ext}", num_frames=12, width=64, height=48, codec=codec, gop=4)
    for mode in ("decode", "packets"):
        info = probe_video(clip, count=mode)
        assert info.num_frames == 12
        assert (info.codec, info.width, info.height, info.fps) == (codec, 64, 48, 25.0)
        assert not info.variable_fps and info.decode_error == ""
        assert info.duration == pytest.approx(12 / 25, abs=0.05)


def test_truncated_webm_counts_decoded_frames_not_the_header(make_clip, tmp_path: Path) -> None:
    clip = make_clip("full.webm", num_frames=30, width=64, height=48)
    cut = write_cut_copy(clip, tmp_path / "cut.webm")
    info = probe_video(cut)
    assert info.declared_frames == 30  # the header still promises the whole clip
    assert info.num_frames == decoded_count(cut) < 30


def test_variable_frame_rate_is_detected(make_clip, tmp_path: Path) -> None:
    assert probe_video(write_vfr_clip(tmp_path / "vfr.mkv")).variable_fps
    assert probe_video(write_vfr_clip(tmp_path / "vfr2.mkv"), count="packets").variable_fps
    assert not probe_video(make_clip("cfr.webm", num_frames=12, width=64, height=48)).variable_fps


def test_unusable_files_raise_named_kinds(make_clip, tmp_path: Path) -> None:
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 50)
    cut_mp4 = write_cut_copy(make_clip("h.mp4", num_frames=12, width=64, height=48, codec="h264"),
                             tmp_path / "cut.mp4")  # fmt: skip
    cases = {
        tmp_path / "absent.webm": MISSING,
        tmp_path / "empty.mp4": EMPTY,
        tmp_path / "junk.mp4": UNDECODABLE,
        write_audio_only(tmp_path / "audio.mp4"): NO_VIDEO,
        cut_mp4: TRUNCATED,  # MP4 whose index (moov, written last) was cut off
    }
    for path, kind in cases.items():
        with pytest.raises(ProbeError) as err:
            probe_video(path)
        assert err.value.kind == kind, (path.name, str(err.value))


def test_zero_frame_file_probes_to_zero(make_clip, tmp_path: Path) -> None:
    zero = write_zero_frame_clip(make_clip("s.webm", num_frames=8, width=64, height=48), tmp_path / "z.avi")
    assert probe_video(zero).num_frames == 0


def test_count_images_counts_only_images(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    for name in ("00001.jpg", "00002.jpg", "00003.png", "notes.txt", ".hidden.jpg"):
        (folder / name).write_bytes(b"x")
    assert count_images(folder) == 3
    with pytest.raises(ProbeError):
        count_images(tmp_path / "nope")
