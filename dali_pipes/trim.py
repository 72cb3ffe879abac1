"""GOP-trimmed bitstreams: hand DALI's video decoder only the packets the wanted frames need.

DALI's `fn.decoders.video(frames=...)` builds no keyframe index, so it decodes forward from frame 0
to the highest requested index (see DALI's `FramesDecoderBase::SeekFrame`: without an index it only
skips forward, frame by frame). For a 10 s clip and 8 TSN frames that is ~30 decoded frames per kept
one. Instead, for every wanted frame we take the packets in decode order from the keyframe before it
up to and including its own packet, merge overlapping ranges, and mux them into a small in-memory
Matroska file; the wanted indices are remapped to positions in what that file decodes to.

What the trimmed file decodes to: each range starts at a keyframe (a decoder refresh), so the
decoder outputs the range's packets in presentation (pts) order, range after range. Frame f, in range
r, is therefore output at (frames output by ranges before r) + (rank of f's pts within range r).
B-frames are handled by that rank (a range may output a few frames past f; they are simply not
asked for). A range whose packets show a frame before its keyframe (an open GOP: leading pictures
that reference the previous GOP) cannot decode alone and is refused, naming prep.resize.

Only the byte ranges of those packets are read (`os.pread` at offsets from the packet index); the
Matroska container is written here directly (EBML is a few fixed element ids and lengths), which is
what keeps the cost to a fraction of a millisecond per clip.
"""

from __future__ import annotations

import functools
import os
import struct

import numpy as np

from .video_io import VideoIndex, VideoReadError, gop_spans

CODEC_IDS = {
    "vp8": "V_VP8", "vp9": "V_VP9", "av1": "V_AV1", "mjpeg": "V_MJPEG",
    "h264": "V_MPEG4/ISO/AVC", "hevc": "V_MPEGH/ISO/HEVC",
}  # fmt: skip
TRIMMABLE = tuple(CODEC_IDS)
MAX_GAP = 1 << 16  # bytes between two payloads read along with them (else a separate read)
CLUSTER_MS = 8000  # cluster length: block timestamps are int16 ms offsets from their cluster's


_BLOCK = struct.Struct(">BIBhB")


class TrimError(VideoReadError):
    """A video that cannot be trimmed exactly (open GOP, payloads not stored verbatim, codec)."""


def _size(n: int) -> bytes:
    """EBML variable-length size (the shortest form)."""
    for length in range(1, 8):
        if n < (1 << (7 * length)) - 1:
            return (n | (1 << (7 * length))).to_bytes(length, "big")
    return b"\x01" + n.to_bytes(7, "big")


def _size8(n: int) -> bytes:
    """EBML size in its 8-byte form (lets a parent's size be written before its children are joined)."""
    return b"\x01" + n.to_bytes(7, "big")


def _el(ident: int, payload: bytes) -> bytes:
    return ident.to_bytes((ident.bit_length() + 7) // 8, "big") + _size(len(payload)) + payload


def _uint(ident: int, value: int) -> bytes:
    return _el(ident, value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


@functools.lru_cache(maxsize=64)
def _header(codec: str, width: int, height: int, frame_ms: int, extradata: bytes) -> tuple[bytes, bytes]:
    """EBML header, then the start of a Segment: Info and the one video Tracks entry (the same for
    every clip of one format, hence cached)."""
    ebml = _el(0x1A45DFA3, b"".join([
        _uint(0x4286, 1), _uint(0x42F7, 1), _uint(0x42F2, 4), _uint(0x42F3, 8),
        _el(0x4282, b"matroska"), _uint(0x4287, 4), _uint(0x4285, 2),
    ]))  # fmt: skip
    info = _el(0x1549A966, _uint(0x2AD7B1, 1_000_000) + _el(0x4D80, b"vidrec") + _el(0x5741, b"vidrec"))
    video = _el(0xE0, _uint(0xB0, width) + _uint(0xBA, height))
    entry = b"".join([
        _uint(0xD7, 1), _uint(0x73C5, 1), _uint(0x83, 1), _uint(0x9C, 0),
        _el(0x86, CODEC_IDS[codec].encode()), _uint(0x23E383, frame_ms * 1_000_000), video,
    ])  # fmt: skip
    if extradata:
        entry += _el(0x63A2, extradata)
    return ebml, info + _el(0x1654AE6B, _el(0xAE, entry))


def frame_ms(index: VideoIndex) -> int:
    """One frame's duration in ms (the trimmed file's timeline is synthetic and constant-rate)."""
    num, den = index.time_base
    if len(index.pts) < 2 or not num:
        return 40
    step = float(np.median(np.diff(np.asarray(index.pts[: min(len(index.pts), 64)]))))
    return max(1, round(1000.0 * step * num / den))


def plan(index: VideoIndex, indices: np.ndarray) -> tuple[list[tuple[int, int, np.ndarray]], np.ndarray]:
    """The decode-order packet ranges to keep and the wanted frames' positions in their output.

    Returns (ranges, remapped): ranges are (first, last, rank) with packets first..last in decode
    order and rank[k] the output position of packet first+k within its range; remapped has the
    shape of `indices`.
    """
    packets, frame_packet = index.packets, index.frame_packet
    assert packets is not None and frame_packet is not None
    flat = np.asarray(indices).ravel().astype(np.int64)
    if len(flat) and (flat.min() < 0 or flat.max() >= len(frame_packet)):
        n = len(frame_packet)
        raise VideoReadError(f"frame {int(flat.max())} requested but the video has {n} frames")
    spans = gop_spans(index, flat)
    pts = packets["pts"]
    ranges = []
    firsts, outs = [], []  # per range: first packet, output position of its first frame
    out = 0
    for s, e in spans:
        seg_pts = pts[s : e + 1]
        if len(seg_pts) > 1 and seg_pts[1:].min() < seg_pts[0]:
            raise TrimError(
                f"open GOP: a frame after the keyframe at packet {s} is shown before it (needs the previous "
                "GOP); re-encode with closed GOPs (python -m prep.resize) or set data.trim: off"
            )
        rank = np.empty(len(seg_pts), np.int64)
        rank[np.argsort(seg_pts, kind="stable")] = np.arange(len(seg_pts))
        ranges.append((s, e, rank))
        firsts.append(s)
        outs.append(out)
        out += len(seg_pts)
    want_packets = frame_packet[flat].astype(np.int64)
    r = np.searchsorted(np.asarray(firsts), want_packets, side="right") - 1
    remapped = np.array([outs[i] + int(ranges[i][2][p - firsts[i]]) for i, p in zip(r.tolist(),
                         want_packets.tolist(), strict=True)], dtype=np.int32)  # fmt: skip
    return ranges, remapped.reshape(np.shape(indices))


def decoded_frames(index: VideoIndex, indices: np.ndarray, trimmed: bool = True) -> int:
    """Frames DALI's video decoder decodes for `indices`: it has no keyframe index and decodes from
    frame 0 to the highest index it is given (the remapped one in the trimmed file). prep.audit and
    the profiler both count it this way."""
    top = int(np.max(plan(index, indices)[1])) if trimmed else int(np.max(indices))
    return top + 1


def trim(
    path: str, index: VideoIndex, indices: np.ndarray, fd: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(Matroska bytes as uint8, remapped indices) holding exactly what `indices` need from `path`."""
    if index.codec not in CODEC_IDS:
        raise TrimError(f"codec {index.codec} cannot be trimmed (set data.trim: off)")
    packets = index.packets
    assert packets is not None
    ranges, remapped = plan(index, indices)
    ms = frame_ms(index)
    offsets, sizes, flags = packets["offset"], packets["size"], packets["flags"]
    # layout: small header writes and payload slots at positions after the Segment header
    writes: list[tuple[int, bytes]] = []
    groups: list[tuple[int, list[tuple[int, int, int]]]] = []  # (file offset, [(gap, slot, size)])
    pos = 0
    out = 0  # frames output by earlier ranges
    per_cluster = max(1, CLUSTER_MS // ms)
    for s, e, rank in ranges:
        if offsets[s : e + 1].min() < 0:
            raise TrimError("packet payloads are not stored verbatim in the file (set data.trim: off)")
        stamps = ((out + rank) * ms).tolist()
        starts = offsets[s : e + 1].tolist()
        lengths = sizes[s : e + 1].tolist()
        keyframe = (flags[s : e + 1] & 1).tolist()
        prev_end = -1
        for c0 in range(0, e + 1 - s, per_cluster):
            c1 = min(e + 1 - s, c0 + per_cluster)
            base = stamps[c0]
            timestamp = _uint(0xE7, base)
            body = len(timestamp) + _BLOCK.size * (c1 - c0) + sum(lengths[c0:c1])
            writes.append((pos, b"\x1f\x43\xb6\x75" + _size8(body) + timestamp))
            pos += 12 + len(timestamp)
            for k in range(c0, c1):
                o, n = starts[k], lengths[k]
                # SimpleBlock: id, 4-byte size, track 1, int16 time offset, flags; then the payload
                writes.append((pos, _BLOCK.pack(0xA3, (n + 4) | 0x10000000, 0x81, stamps[k] - base,
                                                0x80 if keyframe[k] else 0)))  # fmt: skip
                pos += _BLOCK.size
                if prev_end < 0 or o < prev_end or o - prev_end > MAX_GAP or len(groups[-1][1]) >= 500:
                    groups.append((o, []))
                    prev_end = o
                groups[-1][1].append((o - prev_end, pos, n))
                prev_end = o + n
                pos += n
        out += e + 1 - s
    ebml, head = _header(index.codec, index.width, index.height, ms, index.extradata)
    prefix = b"".join([ebml, b"\x18\x53\x80\x67", _size8(len(head) + pos), head])
    data = np.empty(len(prefix) + pos, dtype=np.uint8)
    view = memoryview(data)
    view[: len(prefix)] = prefix
    at = len(prefix)
    for p, b in writes:
        view[at + p : at + p + len(b)] = b
    # payloads go straight from the file into their slots (preadv); block/chunk headers between
    # them land in a scratch buffer
    scratch = bytearray(max((g for _, items in groups for g, _, _ in items), default=0))
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDONLY)
    try:
        for lo, items in groups:
            buffers = []
            for gap, slot, n in items:
                if gap:
                    buffers.append(memoryview(scratch)[:gap])
                buffers.append(view[at + slot : at + slot + n])
            expected = sum(len(b) for b in buffers)
            got = os.preadv(fd, buffers, lo)
            if got != expected:
                raise VideoReadError(f"file ends before byte {lo + expected}, which the packet index needs")
    finally:
        if own:
            os.close(fd)
    return data, remapped
