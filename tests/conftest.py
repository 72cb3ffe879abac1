"""Shared fixtures: tests make their own tiny clips with ffmpeg (nothing large is committed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest


def frame_content(index: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """A frame that differs strongly from every other index: an 8x8 random colour grid, upsampled.

    Blocky, low-frequency content survives lossy coding well, so a decoded frame matches its own
    index far better than its neighbours (what index-accuracy tests rely on).
    """
    rng = np.random.default_rng([seed, index])
    grid = rng.integers(16, 240, size=(8, 8, 3), dtype=np.uint8)
    ys = (np.arange(height) * 8 // height)[:, None]
    xs = (np.arange(width) * 8 // width)[None, :]
    return grid[ys, xs]


def write_clip(
    path: Path,
    num_frames: int = 48,
    width: int = 96,
    height: int = 64,
    fps: int = 25,
    codec: str = "vp9",
    gop: int = 16,
    seed: int = 0,
) -> Path:
    """Encode `num_frames` frames of `frame_content` with ffmpeg; returns `path`."""
    codecs = {
        "vp9": ["-c:v", "libvpx-vp9", "-b:v", "0", "-crf", "20", "-deadline", "realtime", "-cpu-used", "8"],
        "vp8": ["-c:v", "libvpx", "-b:v", "1M", "-crf", "10", "-deadline", "realtime", "-cpu-used", "8"],
        "mjpeg": ["-c:v", "mjpeg", "-q:v", "3"],
        "h264": ["-c:v", "libx264", "-preset", "ultrafast", "-crf", "18"],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.stack([frame_content(i, width, height, seed) for i in range(num_frames)])
    pix = "yuvj420p" if codec == "mjpeg" else "yuv420p"
    cmd = [
        "ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
        "-s", f"{width}x{height}", "-r", str(fps), "-i", "-",
        *codecs[codec], "-g", str(gop), "-keyint_min", str(gop), "-pix_fmt", pix, "-an", str(path),
    ]  # fmt: skip
    subprocess.run(cmd, input=frames.tobytes(), check=True)
    return path


@pytest.fixture(scope="session")
def ffmpeg_available() -> None:
    if not (shutil.which("ffmpeg") and shutil.which("ffprobe")):
        pytest.fail("ffmpeg/ffprobe not on PATH: run the tests through `make test`, which installs them")


@pytest.fixture
def one_thread():
    """Tiny models run faster on one torch thread, and do not stall when other processes share the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_clip(ffmpeg_available, tmp_path):
    """`make_clip(name, **kw)` writes a small clip under tmp_path (see write_clip for kw)."""

    def _make(name: str = "clip.webm", **kw) -> Path:
        return write_clip(tmp_path / name, **kw)

    return _make


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests on machines without CUDA (CI has none)."""
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
