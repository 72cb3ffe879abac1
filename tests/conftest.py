"""Shared fixtures: tests make their own tiny clips with ffmpeg (nothing large is committed).

Clip sizes, the rule: a clip that a `gpu`-marked test decodes on NVDEC is at least NVDEC_MIN (160x144),
made by `clip_size("gpu")`; NVDEC refuses smaller videos when it creates the decoder ("Video is too
small in at least one dimension"; its minimum is believed to be about 128x128 for VP9/HEVC, 48x16 for
H.264), so a smaller GPU test clip fails on size, not on a bug. The GPU kit's probe prints the real
minima (`NVDEC <codec> ... min=WxH`); should one exceed 160x144, VIDREC_NVDEC_MIN=WxH raises the size
(it never lowers it). The CPU twins of those tests (same body, `data.device: cpu`, run in CI) use
`clip_size("cpu")` (64x48) to keep CI fast.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

NVDEC_MIN = (160, 144)  # (width, height) of every clip a gpu-marked test decodes on NVDEC (multiples of 16)
CPU_TWIN = (64, 48)  # the CPU twins' clips: small, CI time


def clip_size(device: str) -> tuple[int, int]:
    """(width, height) of a test clip decoded on `device` (gpu | cpu): see the module docstring's rule."""
    if device != "gpu":
        return CPU_TWIN
    probed = os.environ.get("VIDREC_NVDEC_MIN", "")
    if not probed:
        return NVDEC_MIN
    found = re.fullmatch(r"(\d+)x(\d+)", probed)
    if not found:
        raise ValueError(f"VIDREC_NVDEC_MIN={probed!r}: expected WxH, e.g. 176x144")
    even = [int(v) + int(v) % 2 for v in found.groups()]  # 4:2:0 needs even sides
    return max(NVDEC_MIN[0], even[0]), max(NVDEC_MIN[1], even[1])


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
    bframes: int | None = None,
) -> Path:
    """Encode `num_frames` frames of `frame_content` with ffmpeg; returns `path`.

    h264/hevc: `bframes` forces that many B-frames per run (no adaptive choice, no scene cuts), so the
    stream really has reordered frames (pts != dts); None keeps the encoder's default.
    """
    codecs = {
        "vp9": ["-c:v", "libvpx-vp9", "-b:v", "0", "-crf", "20", "-deadline", "realtime", "-cpu-used", "8"],
        "vp8": ["-c:v", "libvpx", "-b:v", "1M", "-crf", "10", "-deadline", "realtime", "-cpu-used", "8"],
        "mjpeg": ["-c:v", "mjpeg", "-q:v", "3"],
        "h264": ["-c:v", "libx264", "-preset", "ultrafast", "-crf", "18"],
        "hevc": ["-c:v", "libx265", "-preset", "ultrafast", "-crf", "18"],
    }
    params = ["log-level=error"] if codec == "hevc" else []  # x265 logs to stderr by itself
    if bframes is not None and codec in ("h264", "hevc"):
        params.append(f"bframes={bframes}:b-adapt=0:scenecut=0:open-gop=0")
    extra = [f"-{'x265' if codec == 'hevc' else 'x264'}-params", ":".join(params)] if params else []
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.stack([frame_content(i, width, height, seed) for i in range(num_frames)])
    pix = "yuvj420p" if codec == "mjpeg" else "yuv420p"
    cmd = [
        "ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
        "-s", f"{width}x{height}", "-r", str(fps), "-i", "-",
        *codecs[codec], *extra, "-g", str(gop), "-keyint_min", str(gop), "-pix_fmt", pix, "-an", str(path),
    ]  # fmt: skip
    subprocess.run(cmd, input=frames.tobytes(), check=True)
    return path


def assert_sampled_frames(clip: np.ndarray, ref: np.ndarray, want: np.ndarray, x0: int, tol: float) -> None:
    """Each frame of `clip` (T, C, S, S; pixel values) is the centre crop `[:, x0:x0 + S]` of its own
    index's reference frame (median level difference <= tol) and clearly not its neighbours'."""
    side = clip.shape[-1]
    crop = ref[:, :side, x0 : x0 + side].astype(np.float32)
    for out, i in zip(clip, want, strict=True):
        img = out.transpose(1, 2, 0)
        own = np.abs(img - crop[i])
        assert np.median(own) <= tol, (i, np.median(own))
        for j in (i - 1, i + 1):
            if 0 <= j < len(ref) and j != i:
                assert np.abs(img - crop[j]).mean() > own.mean() + 5


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
