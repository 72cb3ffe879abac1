"""The one place that asks PyAV about a video file (or counts a frame folder).

Frame counts come from what a decoder really delivers (`count="decode"`, the default) or from the
demuxed video packets (`count="packets"`, ~10x faster, equal for ordinary files); never from the
container's header estimate, which is often wrong for web videos (see docs/DATA.md "Frame sampling").
Problems that make a file unusable raise `ProbeError(kind, detail)`; `kind` is one of the names that
prep.validate reports.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av

from prep.common import IMAGE_EXTENSIONS

MISSING = "missing"
EMPTY = "empty"
TRUNCATED = "truncated"
UNDECODABLE = "undecodable"
NO_VIDEO = "no video stream"

COUNT_MODES = ("decode", "packets", "header")
# FFmpeg demuxers of raw elementary streams: no container, so no timestamps (whatever the file's name)
RAW_FORMATS = frozenset({"h264", "hevc", "vvc", "mpegvideo", "m4v", "obu"})


class ProbeError(Exception):
    """A file that cannot be used at all; `kind` says why in one of the validate report's words."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class VideoInfo:
    codec: str  # codec name, e.g. h264, vp9, av1, mjpeg (not the decoder's: libdav1d decodes av1)
    width: int
    height: int
    rate: Fraction | None  # average frame rate (frames per second); None when the file does not say
    num_frames: int  # counted frames (see count_mode); the container estimate when count_mode == "header"
    declared_frames: int  # what the container claims (frame count or duration x rate); 0 if unknown
    duration: float  # seconds, from the container; 0.0 if unknown
    variable_fps: bool  # timestamps are not evenly spaced (checked only when counting)
    decode_error: str  # "" or the error that stopped decoding after num_frames frames
    count_mode: str  # decode | packets | header
    sample_aspect: Fraction | None = None  # pixel aspect ratio if not square
    pix_fmt: str = ""  # decoder pixel format, e.g. yuv420p, yuv420p10le, yuv444p
    rotation: int = 0  # display rotation in degrees (0, 90, 180, 270) from the first decoded frame
    container: str = ""  # FFmpeg demuxer name, e.g. mov,mp4,m4a,3gp,3g2,mj2 / matroska,webm / h264 (raw)
    sizes: tuple[tuple[int, int], ...] = ()  # distinct decoded frame sizes (w, h), in order (decode only)

    @property
    def fps(self) -> float:
        return float(self.rate) if self.rate else 0.0


def _open(path: Path) -> av.container.InputContainer:
    if not path.exists():
        raise ProbeError(MISSING, "no such file")
    if path.is_dir():
        raise ProbeError(UNDECODABLE, "is a directory, not a video file")
    if not path.is_file():  # opening a FIFO would wait for a writer forever
        raise ProbeError(UNDECODABLE, "not a regular file (a FIFO, socket or device)")
    if path.stat().st_size == 0:
        raise ProbeError(EMPTY, "file has 0 bytes")
    try:
        return av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        message = getattr(e, "strerror", None) or str(e)
        if _looks_like_cut_mp4(path):
            raise ProbeError(
                TRUNCATED, f"MP4 without its index (moov atom): an incomplete file? ({message})"
            ) from None
        if _looks_like_cut_matroska(path):
            raise ProbeError(
                TRUNCATED, f"WebM/Matroska that cannot be read through: an incomplete file? ({message})"
            ) from None
        raise ProbeError(UNDECODABLE, f"cannot open: {message}") from None


def _looks_like_cut_mp4(path: Path) -> bool:
    """An MP4/MOV that starts with an 'ftyp' box but cannot be opened is almost always cut short."""
    with open(path, "rb") as f:
        head = f.read(12)
    return len(head) >= 8 and head[4:8] == b"ftyp"


def _looks_like_cut_matroska(path: Path) -> bool:
    """A WebM/MKV that starts with the EBML magic but cannot be opened has lost its tail (cut short)."""
    with open(path, "rb") as f:
        return f.read(4) == b"\x1a\x45\xdf\xa3"


def _is_variable(pts: list[int]) -> bool:
    """True when frame timestamps are not evenly spaced (allowing one tick of rounding, e.g. 33/34 ms)."""
    if len(pts) < 3:
        return False
    ordered = sorted(set(pts))
    deltas = [b - a for a, b in zip(ordered[:-1], ordered[1:], strict=True)]
    typical = statistics.median(deltas)
    tolerance = max(1.0, 0.05 * typical)
    return any(abs(d - typical) > tolerance for d in deltas)


def probe_video(path: str | Path, count: str = "decode") -> VideoInfo:
    """Describe a video file; `count` = decode | packets | header (see the module docstring)."""
    if count not in COUNT_MODES:
        raise ValueError(f"count must be one of {COUNT_MODES}, got {count!r}")
    path = Path(path)
    container = _open(path)
    with container:
        if not container.streams.video:
            kinds = ", ".join(s.type for s in container.streams) or "no streams at all"
            raise ProbeError(NO_VIDEO, f"the file holds {kinds}")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        rate = stream.average_rate or stream.guessed_rate or None
        rate = Fraction(rate) if rate else None
        duration = 0.0
        if stream.duration is not None and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        declared = stream.frames or (round(duration * float(rate)) if rate and duration > 0 else 0)
        sar = stream.sample_aspect_ratio
        sar = Fraction(sar) if sar and sar != 1 else None
        num_frames, variable, error, rotation, sizes = declared, False, "", 0, ()
        if count != "header":
            num_frames, pts, error, rotation, sizes = _count(container, stream, count)
            variable = _is_variable(pts)
        return VideoInfo(
            codec=getattr(ctx.codec, "canonical_name", "") or ctx.name,
            width=ctx.width or stream.width,
            height=ctx.height or stream.height,
            rate=rate,
            num_frames=num_frames,
            declared_frames=declared,
            duration=duration,
            variable_fps=variable,
            decode_error=error,
            count_mode=count,
            sample_aspect=sar,
            pix_fmt=ctx.format.name if ctx.format else "",
            rotation=rotation,
            container=container.format.name,
            sizes=sizes,
        )


def _count(container: av.container.InputContainer, stream, count: str) -> tuple:
    """Count decoded frames (or non-empty packets); also collect timestamps for the VFR check and
    (decode only) the first frame's display rotation and the distinct frame sizes (a stream whose size
    changes midway cannot be stacked into one clip)."""
    n, pts, error, rotation, sizes = 0, [], "", 0, []
    try:
        if count == "decode":
            for frame in container.decode(stream):
                if n == 0:
                    rotation = round(getattr(frame, "rotation", 0) or 0) % 360
                if not sizes or sizes[-1] != (frame.width, frame.height):
                    sizes.append((frame.width, frame.height))
                n += 1
                if frame.pts is not None:
                    pts.append(frame.pts)
        else:
            for packet in container.demux(stream):
                if packet.size:
                    n += 1
                    if packet.pts is not None:
                        pts.append(packet.pts)
    except (av.FFmpegError, OSError) as e:
        error = f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}"
    return n, pts, error, rotation, tuple(dict.fromkeys(sizes))


def count_images(folder: str | Path) -> int:
    """Frames of a frame folder (Something-Something V1 style): the number of image files in it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ProbeError(MISSING, "no such frame folder")
    return sum(
        1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )
