"""Exact frame access with PyAV: seek to the keyframe before each wanted frame and decode forward.

Frame index i is the i-th frame in presentation order, i.e. the i-th frame a straight sequential
decode returns. The mapping index <-> pts comes from demuxing the packets (no decoding): the sorted
packet pts are exactly the decoded frames' pts for VP8/VP9/H.264/MJPEG (checked in the tests against
a sequential decode). Seeking then costs at most one GOP per requested frame instead of decoding from
frame 0, which is what DALI's CPU video decoder does; within that GOP, frames nothing refers to are
skipped unless wanted (see decode_frames).
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass

import av
import numpy as np
from av.video.reformatter import VideoReformatter


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


def _open(path: str) -> av.container.InputContainer:
    if not os.path.exists(path):
        raise VideoReadError(f"{path}: file not found")
    if os.path.getsize(path) == 0:
        raise VideoReadError(f"{path}: file is empty")
    try:
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

    One open per call. For each wanted frame (ascending) it seeks to the keyframe before it unless
    that keyframe lies behind the last decoded frame (then decoding on is cheaper), and feeds packets
    one by one. With `skip_nonref`, every packet that is not a wanted frame is decoded with
    skip_frame=NONREF: the decoder drops it only if no other frame references it (H.264 B-frames with
    nal_ref_idc 0, VP9 frames that refresh no reference), so the wanted frames are bit-identical
    (tests/test_dali_loader.py::test_pyav_fast_path_is_exact). In an intra-only stream (MJPEG) an
    unwanted packet is not decoded at all. Decoding runs on the calling thread: the loader already
    runs one decoder per worker process, and measured per clip, codec threads cost CPU without
    saving any. `stats["decoded"]` (when given) counts the frames the decoder produced. A frame with a
    display rotation is refused (training never rotates: prep.resize does), or with `rotate` (predict,
    for videos in no list) turned as FFmpeg's autorotate would show it.
    """
    index = index or index_video(path)
    wanted = sorted({int(i) for i in np.asarray(indices).ravel()})
    if wanted and (wanted[0] < 0 or wanted[-1] >= index.num_frames):
        raise VideoReadError(
            f"{path}: frame {wanted[-1]} requested but the video has {index.num_frames} frames"
        )
    pos_of_pts = {p: i for i, p in enumerate(index.pts)}
    wanted_pts = {index.pts[i] for i in wanted}
    intra_only = len(index.keyframes) == index.num_frames
    flat = [int(i) for i in np.asarray(indices).ravel()]
    slots: dict[int, list[int]] = {}
    for slot, i in enumerate(flat):
        slots.setdefault(i, []).append(slot)
    got = _RGBWriter(slots, len(flat), path)
    decoded = 0
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "NONE"
        stream.codec_context.thread_count = 1
        ctx = stream.codec_context
        skip_nonref = skip_nonref and ctx.name not in SKIP_FRAME_LATCHED
        packets = None
        current = -1  # index of the last frame the decoder produced
        try:
            for target in wanted:
                if target in got.done:
                    continue
                key = index.keyframes[bisect.bisect_right(index.keyframes, target) - 1]
                if packets is None or key > current:
                    container.seek(index.pts[key], stream=stream, backward=True, any_frame=False)
                    packets = container.demux(stream)
                for packet in packets:
                    wanted_packet = packet.pts in wanted_pts
                    if intra_only and packet.size and not wanted_packet:
                        continue
                    if skip_nonref:
                        ctx.skip_frame = "DEFAULT" if wanted_packet or not packet.size else "NONREF"
                    for frame in ctx.decode(packet):
                        decoded += 1
                        current = pos_of_pts.get(frame.pts, current)
                        if frame.pts in wanted_pts and current not in got.done:
                            if _rotation(frame) and not rotate:
                                raise VideoReadError(f"{path}: {rotation_refused(_rotation(frame))}")
                            got.put(current, frame, _rotation(frame) // 90 if rotate else 0)
                    if target in got.done or current > target:
                        break
                if target not in got.done:
                    raise VideoReadError(f"{path}: frame {target} could not be decoded")
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
