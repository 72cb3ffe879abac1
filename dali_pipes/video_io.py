"""Exact frame access with PyAV: seek to the keyframe before each wanted frame and decode forward.

Frame index i is the i-th frame in presentation order, i.e. the i-th frame a straight sequential
decode returns. The mapping index <-> pts comes from demuxing the packets (no decoding): the sorted
packet pts are exactly the decoded frames' pts for VP8/VP9/H.264/MJPEG (checked in the tests against
a sequential decode). Seeking then costs at most one GOP per requested frame instead of decoding from
frame 0, which is what DALI's CPU video decoder does; within that GOP, frames nothing refers to are
skipped unless wanted (see decode_frames).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import av
import numpy as np
from av.video.reformatter import VideoReformatter

# packet flags of the packet index (dali_pipes.packet_index says what each means)
KEY, DISPOSABLE, DISCARD, RECOVERY = 1, 2, 4, 8


class VideoReadError(RuntimeError):
    """A file that is missing, empty, undecodable or shorter than needed (message says which)."""


@dataclass
class VideoIndex:
    pts: list[int]  # presentation timestamps in frame order
    keyframes: list[int]  # frame indices of keyframes, ascending
    width: int
    height: int
    codec: str = ""
    rotation: int = 0  # display rotation (degrees) of the first frame; the loader refuses rotated files
    # the persistent packet index (dali_pipes.packet_index) also fills these; index_video leaves them empty
    time_base: tuple[int, int] = (0, 1)
    extradata: bytes = b""  # codec configuration (avcC/hvcC for H.264/HEVC), for remuxing
    packets: np.ndarray | None = None  # packet_index.PACKET rows in decode order
    frame_packet: np.ndarray | None = None  # decode position of frame i (frame i = i-th in pts order)
    payload_hash: bytes = bytes(16)  # BLAKE2b-128 of every packet payload in decode order (the digest's)

    @property
    def num_frames(self) -> int:
        return len(self.pts)


def rotation_refused(degrees: int) -> str:
    """Why a rotated file is a bad sample: decoders return the stored (unrotated) picture, so a portrait
    phone video would silently train as landscape. prep.resize applies the rotation."""
    return (f"display rotation {degrees} degrees: the loader does not rotate frames; "
            "re-encode with prep.resize, which applies it")  # fmt: skip


def _rotation(frame) -> int:
    return round(getattr(frame, "rotation", 0) or 0) % 360


def first_frame_rotation(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> int:
    """Display rotation of the first frame: the display matrix reaches PyAV only on decoded frames."""
    try:
        container.seek(0, stream=stream)
        return _rotation(next(container.decode(stream)))
    except Exception:
        return 0  # decode errors are reported by decode_frames, which names the frame


# Codecs whose decoders take the pixel format from the bitstream (not from the container): opening them
# for decode_frames, FFmpeg's stream probe is told a format and to skip every frame, so it does not decode
# the first frame only to learn what the packet index already says (1.6-2.0 CPU-ms per clip at 426x320,
# docs/BENCHMARKS.md). Frames still carry their real format, which the RGB conversion reads.
PROBE_WITHOUT_DECODING = frozenset({"h264", "hevc", "vp8", "vp9"})
_NO_PROBE_DECODE = {"pixel_format": "yuv420p", "skip_frame": "all"}


def _open(path: str, codec: str = "") -> av.container.InputContainer:
    """Open `path` for reading; `codec` (from the packet index) lets the stream probe skip decoding."""
    if not os.path.exists(path):
        raise VideoReadError(f"{path}: file not found")
    if os.path.getsize(path) == 0:
        raise VideoReadError(f"{path}: file is empty")
    try:
        if codec in PROBE_WITHOUT_DECODING:
            container = av.open(path, options=_NO_PROBE_DECODE)
        else:
            container = av.open(path)
    except Exception as e:  # PyAV raises several FFmpeg error classes
        raise VideoReadError(f"{path}: cannot open ({e})") from None
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"{path}: no video stream")
    return container


def index_video(path: str) -> VideoIndex:
    """Demux every packet of the first video stream (cheap: no decoding) into a frame index."""
    with _open(path) as container:
        stream = container.streams.video[0]
        packets = []
        try:
            for packet in container.demux(stream):
                # packets the demuxer marks discard (edit lists) never come out of the decoder
                if packet.size and packet.pts is not None and not getattr(packet, "is_discard", False):
                    packets.append((packet.pts, bool(packet.is_keyframe)))
        except Exception as e:
            raise VideoReadError(f"{path}: cannot read packets ({e})") from None
        width, height = stream.codec_context.width, stream.codec_context.height
        codec = stream.codec_context.name
        rotation = first_frame_rotation(container, stream) if packets else 0
    packets.sort()
    if not packets:
        raise VideoReadError(f"{path}: no decodable video frames")
    keyframes = [i for i, (_, key) in enumerate(packets) if key] or [0]
    return VideoIndex([p for p, _ in packets], keyframes, width, height, codec, rotation)


# Decoders that read skip_frame once, when they open (FFmpeg's libdav1d wrapper): opened while an unwanted
# packet asks for NONREF, they never output a non-reference frame, so a wanted one is lost ("frame 3 could
# not be decoded" on SVT-AV1 files in train mode). They decode every frame instead.
SKIP_FRAME_LATCHED = frozenset({"libdav1d"})


class _RGBWriter:
    """Decoded frames -> slots of one uint8 (n, H, W, 3) RGB array, through one reused swscale context.

    `frame.to_ndarray(format="rgb24")` builds a reformatter per frame and scales on "auto" threads:
    0.77 ms of CPU per 426x320 frame against 0.11 here, with identical pixels; writing straight into
    the preallocated output also saves the per-frame array and the final np.stack (docs/BENCHMARKS.md).
    """

    def __init__(self, slots: dict[int, list[int]], count: int, path: str = "") -> None:
        self.slots, self.count, self.path = slots, count, path
        self.reformatter = VideoReformatter()
        self.out: np.ndarray | None = None
        self.done: set[int] = set()

    def put(self, frame_index: int, frame: av.VideoFrame, turns: int = 0) -> None:
        """Store `frame` as RGB, turned `turns` quarter turns counterclockwise (its display rotation)."""
        rgb = self.reformatter.reformat(frame, format="rgb24", threads=1)
        plane = rgb.planes[0]
        view = np.frombuffer(plane, np.uint8).reshape(rgb.height, plane.line_size)[:, : rgb.width * 3]
        image = view.reshape(rgb.height, rgb.width, 3)
        if turns:
            image = np.rot90(image, turns)
        height, width = image.shape[:2]
        if self.out is None:
            self.out = np.empty((self.count, height, width, 3), np.uint8)
        elif self.out.shape[1:3] != (height, width):
            before = f"{self.out.shape[2]}x{self.out.shape[1]}"
            raise VideoReadError(f"{self.path}: the frame size changes midway ({before} then {width}x"
                                 f"{height}): a clip cannot mix sizes; re-encode with prep.resize")
        for slot in self.slots[frame_index]:
            self.out[slot] = image
        self.done.add(frame_index)


def gop_spans(index: VideoIndex, frames: np.ndarray) -> list[tuple[int, int]]:
    """Decode-order packet ranges [first, last] that decode `frames` (needs the packet index).

    For each wanted frame: from the keyframe before its packet up to that packet; overlapping or
    adjacent ranges are merged. Both decoding routes decode exactly these ranges: the PyAV route seeks
    to each range's keyframe, and the trimmed DALI route (dali_pipes.trim) muxes them into a new file.
    """
    packets, frame_packet = index.packets, index.frame_packet
    assert packets is not None and frame_packet is not None
    keys = np.nonzero(packets["flags"] & KEY)[0]
    if len(keys) == 0 or keys[0] != 0:
        keys = np.concatenate([[0], keys])
    ends = frame_packet[np.unique(np.asarray(frames).ravel())].astype(np.int64)
    starts = keys[np.searchsorted(keys, ends, side="right") - 1]
    order = np.argsort(starts, kind="stable")
    spans: list[list[int]] = []
    for s, e in zip(starts[order].tolist(), ends[order].tolist(), strict=True):
        if spans and s <= spans[-1][1] + 1:  # overlapping or adjacent: one range
            spans[-1][1] = max(spans[-1][1], e)
        else:
            spans.append([s, e])
    return [(s, e) for s, e in spans]


def decode_plan(index: VideoIndex, frames: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
    """What decode_frames decodes for `frames`: per range of gop_spans, (first, last, produced), where
    produced[k] says whether packet first+k yields a decoded frame: it is wanted, or other frames
    reference it (skip_frame=NONREF drops the rest), and the demuxer does not discard it.

    The PyAV route follows this plan, and prep.audit prices a video with it, so the cost the audit
    predicts is the count the route reports (`stats["decoded"]`).
    """
    packets, frame_packet = index.packets, index.frame_packet
    assert packets is not None and frame_packet is not None
    want = np.zeros(len(packets), bool)
    want[frame_packet[np.asarray(frames).ravel()]] = True
    flags = packets["flags"]
    produced = (want | ((flags & DISPOSABLE) == 0)) & ((flags & DISCARD) == 0)
    return [(s, e, produced[s : e + 1]) for s, e in gop_spans(index, frames)]


def _full_index(path: str) -> VideoIndex:
    """The packet index of one file, demuxed now (callers with a list pass its stored index)."""
    from .packet_index import build_video_index  # packet_index builds on this module

    return build_video_index(path)


def decode_frames(
    path: str,
    indices: np.ndarray,
    index: VideoIndex | None = None,
    *,
    skip_nonref: bool = True,
    stats: dict[str, int] | None = None,
    rotate: bool = False,
) -> np.ndarray:
    """Frames at `indices` (any order, repeats allowed) as uint8 (n, H, W, 3) RGB.

    One open per call. For each range of decode_plan it seeks to the range's keyframe, feeds its
    packets up to the last one a wanted frame needs, and drains the decoder (so every frame it decoded
    comes out and is counted). With `skip_nonref`, every packet that is not a wanted frame is decoded
    with skip_frame=NONREF: the decoder drops it only if no other frame references it (H.264 B-frames
    with nal_ref_idc 0, VP9 frames that refresh no reference), so the wanted frames are bit-identical
    (tests/test_dali_loader.py::test_pyav_fast_path_is_exact). In an intra-only stream (MJPEG) a
    range holds wanted frames only. Decoding runs on the calling thread: the loader already runs one
    decoder per worker process, and measured per clip, codec threads cost CPU without saving any.
    `stats["decoded"]` (when given) counts the frames the decoder produced; `index` must be a packet
    index (dali_pipes.packet_index), else one is demuxed here. A frame with a display rotation is
    refused (training never rotates: prep.resize does), or with `rotate` (predict, for videos in no
    list) turned as FFmpeg's autorotate would show it.
    """
    if index is None or index.packets is None:
        index = _full_index(path)
    flat = [int(i) for i in np.asarray(indices).ravel()]
    wanted = sorted(set(flat))
    if wanted and (wanted[0] < 0 or wanted[-1] >= index.num_frames):
        raise VideoReadError(
            f"{path}: frame {wanted[-1]} requested but the video has {index.num_frames} frames"
        )
    pos_of_pts = {p: i for i, p in enumerate(index.pts)}
    wanted_pts = {index.pts[i] for i in wanted}
    packet_pts = index.packets["pts"]
    slots: dict[int, list[int]] = {}
    for slot, i in enumerate(flat):
        slots.setdefault(i, []).append(slot)
    got = _RGBWriter(slots, len(flat), path)
    decoded = 0
    with _open(path, index.codec) as container:
        stream = container.streams.video[0]
        stream.thread_type = "NONE"
        stream.codec_context.thread_count = 1
        ctx = stream.codec_context
        skip_nonref = skip_nonref and ctx.name not in SKIP_FRAME_LATCHED

        def take(packet) -> None:
            nonlocal decoded
            for frame in ctx.decode(packet):
                decoded += 1
                i = pos_of_pts.get(frame.pts, -1)
                if frame.pts in wanted_pts and i not in got.done:
                    if _rotation(frame) and not rotate:
                        raise VideoReadError(f"{path}: {rotation_refused(_rotation(frame))}")
                    got.put(i, frame, _rotation(frame) // 90 if rotate else 0)

        try:
            for first, last, _ in decode_plan(index, np.array(wanted, np.int64)):
                container.seek(int(packet_pts[first]), stream=stream, backward=True, any_frame=False)
                k = first
                for packet in container.demux(stream):
                    if not packet.size or (k == first and packet.pts != packet_pts[first]):
                        continue  # the demuxer's end packet, or one before the range's keyframe
                    if packet.pts != packet_pts[k]:
                        raise VideoReadError(f"{path}: packet {k} differs from the packet index (re-index)")
                    if skip_nonref:
                        ctx.skip_frame = "DEFAULT" if packet.pts in wanted_pts else "NONREF"
                    take(packet)
                    k += 1
                    if k > last:
                        break
                ctx.skip_frame = "DEFAULT"
                take(None)  # drain: the frames still held for reordering
            missing = [i for i in wanted if i not in got.done]
            if missing:
                raise VideoReadError(f"{path}: frame {missing[0]} could not be decoded")
        except VideoReadError:
            raise
        except Exception as e:
            raise VideoReadError(f"{path}: decoding failed ({e})") from None
    if stats is not None:
        stats["decoded"] = stats.get("decoded", 0) + decoded
        stats["kept"] = stats.get("kept", 0) + len(flat)
    if got.out is None:
        raise VideoReadError(f"{path}: no frame requested")
    return got.out


def decode_all(path: str) -> np.ndarray:
    """Every frame by a straight sequential decode (the reference the seeking route must match)."""
    with _open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
