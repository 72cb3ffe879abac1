"""Exact frame access with PyAV: seek to the keyframe before each wanted frame and decode forward.

Frame index i is the i-th frame in presentation order, i.e. the i-th frame a straight sequential
decode returns. The mapping index <-> pts comes from demuxing the packets (no decoding): the sorted
packet pts are exactly the decoded frames' pts for VP8/VP9/H.264/MJPEG (checked in the tests against
a sequential decode). Seeking then costs at most one GOP per requested frame instead of decoding from
frame 0, which is what DALI's CPU video decoder does.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass

import av
import numpy as np


class VideoReadError(RuntimeError):
    """A file that is missing, empty, undecodable or shorter than needed (message says which)."""


@dataclass
class VideoIndex:
    pts: list[int]  # presentation timestamps in frame order
    keyframes: list[int]  # frame indices of keyframes, ascending
    width: int
    height: int
    codec: str = ""
    # the persistent packet index (dali_pipes.packet_index) also fills these; index_video leaves them empty
    time_base: tuple[int, int] = (0, 1)
    extradata: bytes = b""  # codec configuration (avcC/hvcC for H.264/HEVC), for remuxing
    packets: np.ndarray | None = None  # packet_index.PACKET rows in decode order
    frame_packet: np.ndarray | None = None  # decode position of frame i (frame i = i-th in pts order)

    @property
    def num_frames(self) -> int:
        return len(self.pts)


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
    packets.sort()
    if not packets:
        raise VideoReadError(f"{path}: no decodable video frames")
    keyframes = [i for i, (_, key) in enumerate(packets) if key] or [0]
    return VideoIndex([p for p, _ in packets], keyframes, width, height, codec)


def decode_frames(path: str, indices: np.ndarray, index: VideoIndex | None = None) -> np.ndarray:
    """Frames at `indices` (any order, repeats allowed) as uint8 (n, H, W, 3) RGB."""
    index = index or index_video(path)
    wanted = sorted({int(i) for i in np.asarray(indices).ravel()})
    if wanted and (wanted[0] < 0 or wanted[-1] >= index.num_frames):
        raise VideoReadError(
            f"{path}: frame {wanted[-1]} requested but the video has {index.num_frames} frames"
        )
    pos_of_pts = {p: i for i, p in enumerate(index.pts)}
    got: dict[int, np.ndarray] = {}
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "SLICE"  # one process per worker already; frame threads add latency
        frames_iter = None
        current = -1  # index of the last frame decoded
        try:
            for target in wanted:
                key = index.keyframes[bisect.bisect_right(index.keyframes, target) - 1]
                if frames_iter is None or key > current:
                    container.seek(index.pts[key], stream=stream, backward=True, any_frame=False)
                    frames_iter = container.decode(stream)
                for frame in frames_iter:
                    current = pos_of_pts.get(frame.pts, -1)
                    if current == target:
                        got[target] = frame.to_ndarray(format="rgb24")
                        break
                    if current > target:
                        break
                if target not in got:
                    raise VideoReadError(f"{path}: frame {target} could not be decoded")
        except VideoReadError:
            raise
        except Exception as e:
            raise VideoReadError(f"{path}: decoding failed ({e})") from None
    return np.stack([got[int(i)] for i in np.asarray(indices).ravel()])


def decode_all(path: str) -> np.ndarray:
    """Every frame by a straight sequential decode (the reference the seeking route must match)."""
    with _open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
