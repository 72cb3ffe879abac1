"""One persistent packet index per list: built once by demuxing (no decoding), shared by every worker.

Per video: every packet of the first video stream in decode order (pts, dts, byte offset of the
payload in the file, size, keyframe / disposable / discard / recovery flags), one hash of all the
payloads, and stream facts (codec, size, time base, codec extradata). The loader reads frame pts and
keyframes from it (PyAV route) and `trim` reads only the byte ranges it needs (DALI decoder route), so
no sample demuxes a file; `digest` hashes it for the dataset fingerprint.

The index of a list lives beside it, `LIST.index`, sized for Kinetics (240k videos; docs/BENCHMARKS.md):
- a file header, then segments. A segment is the entries' records (each packet table delta-coded:
  frame-of-reference + common divisor + the fewest bytes per column, about 5-7 bytes per packet),
  a sorted table of 64-bit key hashes and a table of record offsets. Opening reads the segment
  headers and memory-maps the two small tables (no per-entry Python object); a lookup is a binary
  search, one `pread` of the record and a few numpy operations. Records are read with `pread`, not
  mapped, so a worker's memory stays flat however many videos it reads.
- adding videos appends a segment under an exclusive lock and then moves the committed length in the
  header: readers never see a half-written segment, and nothing written is rewritten. `compact`
  (prep.validate, or `python -m dali_pipes.packet_index compact INDEX`) merges the segments into one.
- entries are keyed by the video's path relative to the list's folder and carry the file's size and
  mtime. The loader checks them where the sample is read (the file it opens anyway); a changed file is
  demuxed again in that worker, with a warning. The full check of every file is offline: prep.validate.
- a segment may carry a seal, the (size, mtime) of the list it completed: a job whose list matches the
  seal starts without looking at the entries at all. Otherwise the ranks build disjoint shares of what
  is missing, wait at a barrier and rank 0 seals (`prepare_index`): one build per job, never N copies.
A list in a read-only folder gets its index in the user's cache instead (cache_path_for).
"""

from __future__ import annotations

import argparse
import bisect
import fcntl
import hashlib
import logging
import mmap
import multiprocessing
import os
import struct
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from engine.fileio import atomic_write
from engine.lifetime import pool_options

from .video_io import DISCARD, DISPOSABLE, KEY, RECOVERY, VideoIndex, VideoReadError, first_frame_rotation

log = logging.getLogger(__name__)

# packet flags (KEY, DISPOSABLE, DISCARD, RECOVERY: defined in video_io). DISPOSABLE: a picture no other
# frame references (the container's flag, or for H.264/HEVC read from the NAL headers, as FFmpeg's
# skip_frame=NONREF decides); RECOVERY: the container calls it a keyframe but it is no decoder refresh
# (an open-GOP / recovery-point I-frame: decoding cannot start there). FLAG_BITS: bits a record keeps.
# The payloads themselves are summed up once per video (VideoIndex.payload_hash: BLAKE2b-128 of every
# payload in decode order), so the index's digest (dataset fingerprint) changes with any payload byte
# at 16 bytes per video instead of a CRC-32 (4 bytes) per packet.
PACKET = np.dtype([("pts", "<i8"), ("dts", "<i8"), ("offset", "<i8"), ("size", "<i4"), ("flags", "u1")])
FLAG_BITS = 4
FORMAT = 6  # bumped when the layout or meaning of the records changes; other formats are rebuilt
PARALLEL_FROM = 64  # entries to build before update() starts a process pool
NO_OFFSET = -1  # payload not found verbatim in the file (e.g. Matroska header stripping): no trimming


def index_path_for(list_path: str | Path) -> Path:
    return Path(f"{list_path}.index")


def cache_path_for(index_file: str | Path) -> Path:
    """Where the index of a list in a read-only folder goes instead (one file per list path)."""
    resolved = os.path.abspath(index_file)
    digest = hashlib.sha1(resolved.encode("utf-8")).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "vidrec" / "packet_index" / f"{digest}-{Path(resolved).name}"


def not_a_file(path: str) -> str:
    """Why `path` (not a regular file) cannot be a video: missing, a folder, or something else."""
    if os.path.isdir(path):
        return "is a directory, not a video file"
    return "file not found" if not os.path.exists(path) else "not a regular file (a pipe or device?)"


def file_stamp(path: str) -> tuple[int, int]:
    """(size, mtime_ns) that an index entry must match to be used."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _payload_offset(data: bytes, pos: int, payload: bytes) -> int:
    """Where `payload` starts in the file: at or just after the demuxer's `pos` (block/chunk headers)."""
    if pos < 0 or not payload:
        return NO_OFFSET
    head = payload[:32]
    at = data.find(head, pos, pos + 128 + len(head))
    if at < 0 or data[at : at + len(payload)] != payload:
        return NO_OFFSET
    return at


def _nal_length_size(codec: str, extradata: bytes) -> int | None:
    """H.264/HEVC: bytes of each NAL unit's length prefix (0 = Annex B start codes); None otherwise."""
    if codec == "h264":
        return (extradata[4] & 3) + 1 if len(extradata) > 4 and extradata[0] == 1 else 0
    if codec == "hevc":
        return (extradata[21] & 3) + 1 if len(extradata) > 22 and extradata[0] == 1 else 0
    return None


def _nal_heads(payload: bytes, nal_length: int) -> list[int]:
    """The first header byte of every NAL unit in one H.264/HEVC packet (length-prefixed or Annex B)."""
    heads = []
    if nal_length:
        at = 0
        while at + nal_length < len(payload):
            size = int.from_bytes(payload[at : at + nal_length], "big")
            heads.append(payload[at + nal_length])
            at += nal_length + size
    else:
        at = payload.find(b"\x00\x00\x01")
        while 0 <= at < len(payload) - 3:
            heads.append(payload[at + 3])
            at = payload.find(b"\x00\x00\x01", at + 3)
    return heads


def _nal_types(payload: bytes, codec: str, nal_length: int) -> list[int]:
    """The NAL unit types in one H.264/HEVC packet."""
    return [h & 0x1F if codec == "h264" else (h >> 1) & 0x3F for h in _nal_heads(payload, nal_length)]


def _is_nonref(payload: bytes, codec: str, nal_length: int) -> bool:
    """Whether no other picture references this one: H.264 slices with nal_ref_idc 0, HEVC sub-layer
    non-reference slice types (TRAIL_N, TSA_N, ...: even types below 16); what skip_frame=NONREF drops."""
    heads = _nal_heads(payload, nal_length)
    if codec == "h264":
        slices = [h for h in heads if 1 <= (h & 0x1F) <= 5]
        return bool(slices) and all((h >> 5) & 3 == 0 for h in slices)
    slices = [(h >> 1) & 0x3F for h in heads if (h >> 1) & 0x3F < 32]
    return bool(slices) and all(t < 16 and t % 2 == 0 for t in slices)


def _is_refresh(payload: bytes, codec: str, nal_length: int) -> bool:
    """Whether a packet flagged key really starts a decodable GOP: an IDR (H.264) or IRAP (HEVC)
    picture, not an I-frame with a recovery point (intra refresh), as DALI's own index checks."""
    types = _nal_types(payload, codec, nal_length)
    return any(t == 5 for t in types) if codec == "h264" else any(16 <= t <= 23 for t in types)


def build_video_index(path: str) -> VideoIndex:
    """Demux every packet of the first video stream (no decoding) into a full VideoIndex."""
    if not os.path.isfile(path):
        raise VideoReadError(f"{path}: {not_a_file(path)}")
    if os.path.getsize(path) == 0:
        raise VideoReadError(f"{path}: file is empty")
    with open(path, "rb") as f:
        data = f.read()
    rows = []
    payloads = hashlib.blake2b(digest_size=16)
    try:
        container = av.open(path)
    except Exception as e:  # PyAV raises several FFmpeg error classes
        raise VideoReadError(f"{path}: cannot open ({e})") from None
    with container:
        if not container.streams.video:
            raise VideoReadError(f"{path}: no video stream")
        stream = container.streams.video[0]
        codec = stream.codec_context.name
        nal_length = _nal_length_size(codec, bytes(stream.codec_context.extradata or b""))
        try:
            for packet in container.demux(stream):
                if not packet.size:
                    continue  # the flush packet at the end
                if packet.pts is None:
                    raise VideoReadError(
                        f"{path}: packet {len(rows)} has no timestamp (re-encode with python -m prep.resize)"
                    )
                payload = bytes(packet)
                key = packet.is_keyframe and (nal_length is None or _is_refresh(payload, codec, nal_length))
                nonref = nal_length is not None and _is_nonref(payload, codec, nal_length)
                nonref = nonref or packet.is_disposable
                flags = (KEY if key else 0) | (DISPOSABLE if nonref else 0)
                flags |= RECOVERY if packet.is_keyframe and not key else 0
                flags |= DISCARD if packet.is_discard else 0
                dts = packet.dts if packet.dts is not None else packet.pts
                offset = _payload_offset(data, packet.pos if packet.pos is not None else -1, payload)
                rows.append((packet.pts, dts, offset, packet.size, flags))
                payloads.update(payload)
        except VideoReadError:
            raise
        except Exception as e:
            raise VideoReadError(f"{path}: cannot read packets ({e})") from None
        ctx = stream.codec_context
        tb = stream.time_base
        index = _assemble(
            np.array(rows, dtype=PACKET), ctx.width, ctx.height, ctx.name,
            (tb.numerator, tb.denominator) if tb else (0, 1), bytes(ctx.extradata or b""), path,
        )  # fmt: skip
        index.rotation = first_frame_rotation(container, stream) if rows else 0
        index.payload_hash = payloads.digest()
    return index


def _assemble(packets: np.ndarray, width: int, height: int, codec: str, time_base: tuple[int, int],
              extradata: bytes, path: str) -> VideoIndex:  # fmt: skip
    """VideoIndex from packet rows: frames are the non-discarded packets in pts order."""
    frames = np.nonzero((packets["flags"] & DISCARD) == 0)[0] if len(packets) else np.zeros(0, np.int64)
    if len(frames) == 0:
        raise VideoReadError(f"{path}: no decodable video frames (empty packet index)")
    frame_packet = frames[np.argsort(packets["pts"][frames], kind="stable")].astype(np.int32)
    pts = packets["pts"][frame_packet]
    keyframes = np.nonzero(packets["flags"][frame_packet] & KEY)[0].tolist() or [0]
    return VideoIndex(
        pts.tolist(), keyframes, width, height, codec, time_base=time_base, extradata=extradata,
        packets=packets, frame_packet=frame_packet,
    )  # fmt: skip


def video_digest(index: VideoIndex) -> str:
    """SHA-1 of one video's index (what the decoders see of the file; the dataset fingerprint's unit):
    stream facts, extradata, every packet's timestamps, offset, size and flags, and the payload hash."""
    assert index.packets is not None
    h = hashlib.sha1(f"{index.codec} {index.width}x{index.height} {index.time_base[0]}/{index.time_base[1]}"
                     .encode())  # fmt: skip
    h.update(index.extradata)
    h.update(np.ascontiguousarray(index.packets, PACKET).tobytes())
    h.update(index.payload_hash)
    return h.hexdigest()


# ---- the index file ----------------------------------------------------------------------------

MAGIC, SEGMENT = b"VRPKIDX\x00", b"VRPKSEG\x00"
FILE_HEAD = struct.Struct("<8sQQQ")  # magic, FORMAT, committed end, reserved
SEG_HEAD = struct.Struct("<8sQQQqqQ")  # magic, entries, tables at, end, list size, list mtime_ns, reserved
ENTRY_HEAD = struct.Struct("<qqqqiiiiIHBhI16s")  # see _encode
ROW = struct.Struct("<qQB")  # base, divisor, bytes per value (0: every value is `base`)
PAD = 8  # zero bytes after a record's rows: every value is read with one 4- or 8-byte load
RECENT = 64  # entries demuxed by get() kept per process (changed files): bounded, never grows with an epoch
REL_DIRS = 65536  # folders outside the list's whose key prefix key() remembers (Kinetics: 400 class folders)
WRITE_CHUNK = 1 << 20


def key_hash(key: str) -> int:
    """The 64-bit hash a key is sorted and searched by (collisions are resolved by the stored name)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def _pack_row(values: np.ndarray) -> tuple[bytes, bytes]:
    """(ROW descriptor, data) of an int64 column: (v - base) / divisor in the fewest whole bytes."""
    if len(values) == 0 or values.min() == values.max():
        return ROW.pack(int(values[0]) if len(values) else 0, 1, 0), b""
    base = int(values.min())
    shifted = values.astype(np.uint64) - np.uint64(base % (1 << 64))  # modulo 2**64: no overflow
    div = int(np.gcd.reduce(shifted))
    if 1 < div < (1 << 63):
        shifted //= np.uint64(div)
    width = max(1, (int(shifted.max()).bit_length() + 7) // 8)
    data = shifted.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :width].tobytes()
    return ROW.pack(base, div, width), data


def _unpack_row(buf: bytes, pos: int, n: int) -> tuple[np.ndarray | int, int]:
    """A column written by _pack_row at `pos` (a plain int when constant) and the position after it."""
    base, div, width = ROW.unpack_from(buf, pos)
    pos += ROW.size
    if width == 0:
        return base, pos
    if width in (1, 2, 4, 8):
        raw = np.frombuffer(buf, f"<u{width}", n, pos)
    else:  # 3, 5, 6, 7 bytes: one wider load per value (the record ends in PAD zero bytes), masked
        raw = np.ndarray((n,), "<u4" if width < 4 else "<u8", buf, pos, (width,)) & ((1 << (8 * width)) - 1)
    if div == 1:
        return np.add(raw, base, dtype=np.int64, casting="unsafe"), pos + n * width
    values = np.multiply(raw, div, dtype=np.int64, casting="unsafe")
    values += base
    return values, pos + n * width


def _encode(name: str, stamp: tuple[int, int], idx: VideoIndex) -> bytes:
    """One entry's record: ENTRY_HEAD (stamp, first dts and offset, time base, frame size, packets, name
    and codec lengths, rotation, extradata length, payload hash), name, codec, extradata, then four
    delta-coded packet columns (flags ride in the low FLAG_BITS bits of the pts - dts column)."""
    packets = idx.packets
    assert packets is not None
    n = len(packets)
    dts, pts = packets["dts"].astype(np.int64), packets["pts"].astype(np.int64)
    size, offset = packets["size"].astype(np.int64), packets["offset"].astype(np.int64)
    ctts = pts - dts  # small and periodic (B-frame reordering)
    c_base = int(ctts.min()) if n else 0
    c_div = (int(np.gcd.reduce((ctts - c_base).astype(np.uint64))) or 1) if n else 1
    flags = packets["flags"].astype(np.int64)
    assert not (flags >> FLAG_BITS).any(), "a packet flag the record has no bit for"
    reorder = (((ctts - c_base) // c_div) << FLAG_BITS) + flags
    rows = [np.diff(dts), reorder, size, offset[1:] - offset[:-1] - size[:-1]]  # dts steps, .., offset gaps
    name_b, codec_b = name.encode("utf-8"), idx.codec.encode("ascii", "replace")[:255]
    head = ENTRY_HEAD.pack(stamp[0], stamp[1], int(dts[0]) if n else 0, int(offset[0]) if n else 0,
                           idx.time_base[0], idx.time_base[1], idx.width, idx.height, n, len(name_b),
                           len(codec_b), idx.rotation, len(idx.extradata), idx.payload_hash)  # fmt: skip
    parts = [head, name_b, codec_b, idx.extradata, struct.pack("<qQ", c_base, c_div)]
    for row in rows:
        parts.extend(_pack_row(row))
    parts.append(bytes(PAD))
    return b"".join(parts)


@dataclass
class Record:
    """A stored entry before decoding: enough to check it (stamp) without touching its packets."""

    name: str
    stamp: tuple[int, int]
    blob: bytes
    head: tuple


def _record(blob: bytes) -> Record:
    head = ENTRY_HEAD.unpack_from(blob, 0)
    name = blob[ENTRY_HEAD.size : ENTRY_HEAD.size + head[9]].decode("utf-8")
    return Record(name, (head[0], head[1]), blob, head)


def _decode(rec: Record, path: str) -> VideoIndex:
    """The VideoIndex of a record (the inverse of _encode)."""
    (_, _, dts0, offset0, tb_num, tb_den, width, height, n, name_len, codec_len, rotation,
     extra_len, payload_hash) = rec.head  # fmt: skip
    blob = rec.blob
    pos = ENTRY_HEAD.size + name_len
    codec = blob[pos : pos + codec_len].decode("ascii")
    pos += codec_len
    extradata = blob[pos : pos + extra_len]
    c_base, c_div = struct.unpack_from("<qQ", blob, pos + extra_len)
    pos += extra_len + 16
    steps, pos = _unpack_row(blob, pos, n - 1)
    reorder, pos = _unpack_row(blob, pos, n)
    size, pos = _unpack_row(blob, pos, n)
    gaps, pos = _unpack_row(blob, pos, n - 1)
    packets = np.empty(n, PACKET)
    if n:
        if isinstance(steps, int):  # constant frame duration: the usual case
            dts = np.arange(dts0, dts0 + n * steps, steps) if steps else np.full(n, dts0)
        else:
            dts = np.empty(n, np.int64)
            dts[0] = 0
            np.cumsum(steps, out=dts[1:])
            dts += dts0
        packets["dts"] = dts
        packets["pts"] = dts + ((reorder >> FLAG_BITS) * c_div + c_base)
        packets["flags"] = reorder & ((1 << FLAG_BITS) - 1)
        if isinstance(size, int):  # every packet the same size (a single packet, or raw video)
            size = np.full(n, size, np.int64)
        packets["size"] = size
        offsets = np.empty(n, np.int64)
        offsets[0] = 0
        np.cumsum(size[:-1] + gaps, out=offsets[1:])
        offsets += offset0
        packets["offset"] = offsets
    index = _assemble(packets, width, height, codec, (tb_num, tb_den), extradata, path)
    index.rotation, index.payload_hash = rotation, payload_hash
    return index


@dataclass
class _Segment:
    hashes: memoryview  # sorted uint64 key hashes
    starts: memoryview  # n + 1 record offsets in the file (record i is starts[i]:starts[i + 1])
    seal: tuple[int, int]  # (size, mtime_ns) of the list this segment completed; (0, 0): none


class _Reader:
    """An index file opened for lookups: its fd, and the segments' tables memory-mapped."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        try:
            magic, fmt, end, _ = FILE_HEAD.unpack(os.pread(self.fd, FILE_HEAD.size, 0))
            if magic != MAGIC or fmt != FORMAT or end > os.fstat(self.fd).st_size:
                raise ValueError(f"not a format-{FORMAT} packet index")
            self.map = mmap.mmap(self.fd, end, prot=mmap.PROT_READ) if end else None
            self.segments: list[_Segment] = []
            at = FILE_HEAD.size
            while at < end:
                magic, n, tables, seg_end, l_size, l_mtime, _ = SEG_HEAD.unpack_from(self.map, at)
                if magic != SEGMENT or not at < tables <= seg_end <= end or tables + 16 * n + 8 > seg_end:
                    raise ValueError(f"damaged segment at byte {at}")
                view = memoryview(self.map)
                hashes = view[tables : tables + 8 * n].cast("Q")
                starts = view[tables + 8 * n : tables + 16 * n + 8].cast("Q")
                self.segments.append(_Segment(hashes, starts, (l_size, l_mtime)))
                at = seg_end
        except BaseException:
            os.close(self.fd)
            raise

    def find(self, key: str) -> Record | None:
        """The newest record of `key`, or None."""
        h = key_hash(key)
        for seg in reversed(self.segments):
            i = bisect.bisect_left(seg.hashes, h)
            while i < len(seg.hashes) and seg.hashes[i] == h:
                start = seg.starts[i]
                rec = _record(os.pread(self.fd, seg.starts[i + 1] - start, start))
                if rec.name == key:
                    return rec
                i += 1
        return None

    def seal(self) -> tuple[int, int]:
        return next((s.seal for s in reversed(self.segments) if s.seal != (0, 0)), (0, 0))

    def records(self) -> Iterator[tuple[int, bytes]]:
        """(hash, record) of every key's newest record, newest segments first, each key once."""
        seen: set[str] = set()
        for seg in reversed(self.segments):
            for i, h in enumerate(seg.hashes):
                blob = os.pread(self.fd, seg.starts[i + 1] - seg.starts[i], seg.starts[i])
                name = _record(blob).name
                if name not in seen:
                    seen.add(name)
                    yield h, blob


def _write_segment(fd: int, at: int, records: Iterable[tuple[int, bytes]], seal: tuple[int, int]) -> int:
    """Write (hash, record) pairs, ascending by hash, as one segment at byte `at`; returns its end."""
    hashes, starts, chunk = [], [], []
    pos = at + SEG_HEAD.size
    flushed = pos
    for h, blob in records:
        hashes.append(h)
        starts.append(pos)
        chunk.append(blob)
        pos += len(blob)
        if pos - flushed >= WRITE_CHUNK:
            os.pwrite(fd, b"".join(chunk), flushed)
            chunk, flushed = [], pos
    if chunk:
        os.pwrite(fd, b"".join(chunk), flushed)
    tables = pos + (-pos % 8)
    starts.append(pos)
    table_bytes = np.asarray(hashes, "<u8").tobytes() + np.asarray(starts, "<u8").tobytes()
    os.pwrite(fd, bytes(tables - pos) + table_bytes, pos)
    end = tables + len(table_bytes)
    os.pwrite(fd, SEG_HEAD.pack(SEGMENT, len(hashes), tables, end, seal[0], seal[1], 0), at)
    return end


def _encoded(items: Mapping[str, tuple[tuple[int, int], VideoIndex]]) -> Iterator[tuple[int, bytes]]:
    """(hash, record) of `items`, ascending by hash; each record encoded only when written."""
    for h, name in sorted((key_hash(name), name) for name in items):
        stamp, idx = items[name]
        yield h, _encode(name, stamp, idx)


def _write_new(path: Path, records: Iterable[tuple[int, bytes]], seal: tuple[int, int]) -> None:
    """A whole new index file with one segment, atomically (compaction, or a file of another format)."""

    def write(f) -> None:
        f.flush()
        end = _write_segment(f.fileno(), FILE_HEAD.size, records, seal)
        os.pwrite(f.fileno(), FILE_HEAD.pack(MAGIC, FORMAT, end, 0), 0)
        f.seek(end)

    atomic_write(path, write)


@contextmanager
def _locked(path: Path) -> Iterator[int]:
    """The index file at `path` opened (created if missing) and locked for writing (flock; NFS: POSIX)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not replaced (compacted) while we waited for the lock
                yield fd
                return
        finally:
            os.close(fd)  # closing releases the lock


def _append(path: Path, records: Iterable[tuple[int, bytes]], seal: tuple[int, int]) -> None:
    """Add one segment to the index at `path`: written past the committed end, then committed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path) as fd:
        head = os.pread(fd, FILE_HEAD.size, 0)
        valid = len(head) == FILE_HEAD.size
        magic, fmt, end, _ = FILE_HEAD.unpack(head) if valid else (b"", 0, 0, 0)
        if not valid or magic != MAGIC or fmt != FORMAT or end > os.fstat(fd).st_size:
            if os.fstat(fd).st_size:  # another format, or damaged: replaced whole, never trusted
                log.info("%s: packet index of another format or damaged; writing a new one", path)
            _write_new(path, records, seal)
            return
        new_end = _write_segment(fd, end, records, seal)
        os.fsync(fd)
        os.pwrite(fd, FILE_HEAD.pack(MAGIC, FORMAT, new_end, 0), 0)  # the commit
        os.ftruncate(fd, new_end)
        os.fsync(fd)


class PacketIndex:
    """The packet index of one list file: lookups in the file, plus entries built in this process."""

    def __init__(self, index_file: str | Path) -> None:
        self.path = Path(index_file)
        self.base = self.path.parent  # keys are relative to the list's folder wherever the file lives
        self._prefix = os.path.join(os.path.abspath(self.base), "")
        self.fallback = cache_path_for(self.path)
        self._reader: _Reader | None = None
        self._opened = False
        self._pending: dict[str, tuple[tuple[int, int], VideoIndex]] = {}  # built, not yet written
        self._recent: OrderedDict[str, tuple[tuple[int, int], VideoIndex]] = OrderedDict()
        self.builds = 0  # entries demuxed by this process (tests check that a stored index is reused)
        self._rel_dirs: dict[str, str] = {}  # folder outside the list's -> its key prefix (key())

    def __getstate__(self) -> dict:  # workers open the file themselves
        return {"path": self.path, "_pending": self._pending}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])
        self._pending = dict(state["_pending"])

    def key(self, path: str) -> str:
        """`path` relative to the list's folder, with / (the index's key: the same data elsewhere matches).
        Videos outside that folder (a list kept apart from the data) go through os.path.relpath once per
        folder, not per lookup: it cost 15 µs a lookup (docs/BENCHMARKS.md)."""
        full = os.path.abspath(path)
        if full.startswith(self._prefix):
            return full[len(self._prefix) :].replace(os.sep, "/")
        folder, name = os.path.split(full)
        rel = self._rel_dirs.get(folder)
        if rel is None:
            rel = Path(os.path.relpath(folder, os.path.abspath(self.base))).as_posix()
            if len(self._rel_dirs) < REL_DIRS:
                self._rel_dirs[folder] = rel
        return f"{rel}/{name}"

    def _file(self) -> Path:
        """The file to read: beside the list, or the cache copy when that one is newer."""
        present = [p for p in (self.path, self.fallback) if p.is_file()]
        return max(present, key=lambda p: p.stat().st_mtime_ns) if present else self.path

    def reader(self) -> _Reader | None:
        """The opened file (once per process: O(segments), nothing per entry), or None without one."""
        if not self._opened:
            self._opened = True
            path = self._file()
            if path.is_file():
                try:
                    self._reader = _Reader(path)
                except (OSError, ValueError, struct.error) as e:  # rebuilt by the next write, never trusted
                    log.warning("%s: unreadable packet index (%s); it will be rebuilt", path, e)
        return self._reader

    def refresh(self) -> None:
        """Read the file again at the next lookup (after this or another process wrote to it)."""
        if self._reader is not None:
            os.close(self._reader.fd)
        self._reader, self._opened = None, False

    def _find(self, key: str) -> Record | None:
        reader = self.reader()
        return reader.find(key) if reader is not None else None

    def stored(self, path: str, stamp: tuple[int, int]) -> VideoIndex | None:
        """The entry for `path` if present and made from a file with this (size, mtime)."""
        key = self.key(path)
        for kept in (self._pending.get(key), self._recent.get(key)):
            if kept is not None and kept[0] == stamp:
                return kept[1]
        rec = self._find(key)
        if rec is None or rec.stamp != stamp:
            return None
        return _decode(rec, path)

    def digest(self, path: str, stamp: tuple[int, int]) -> str:
        """video_digest of `path`'s entry: decoded from its record when current (one pread, no demux:
        fast over a whole list), else demuxed now and kept to be saved with the others (save())."""
        found = self.stored(path, stamp)
        if found is None:
            found = build_video_index(path)
            self.add(path, stamp, found)
            self.builds += 1
        return video_digest(found)

    def get(self, path: str, stamp: tuple[int, int] | None = None) -> VideoIndex:
        """The index of `path`: stored when current, else demuxed now (kept in a small per-process cache)."""
        stamp = stamp or file_stamp(path)
        found = self.stored(path, stamp)
        if found is not None:
            return found
        idx = build_video_index(path)
        self.builds += 1
        key = self.key(path)
        if self._find(key) is not None:
            log.warning("%s: changed since its packet index entry was written; demuxed again here "
                        "(python -m prep.validate LIST rebuilds the index)", path)  # fmt: skip
        self._recent[key] = (stamp, idx)
        while len(self._recent) > RECENT:
            self._recent.popitem(last=False)
        return idx

    def sealed(self, list_stamp: tuple[int, int]) -> bool:
        """Whether the index was completed for a list with this (size, mtime)."""
        reader = self.reader()
        return reader is not None and list_stamp != (0, 0) and reader.seal() == list_stamp

    def missing(self, paths: Iterable[str], check_stamps: bool = True) -> list[tuple[str, tuple[int, int]]]:
        """(path, stamp) of the files in `paths` without an entry (missing files are skipped); with
        `check_stamps`, also those whose entry was made from a different file (one stat per file)."""
        out = []
        for p in dict.fromkeys(paths):
            key = self.key(p)
            pending = self._pending.get(key)
            rec = self._find(key) if pending is None else None
            if not check_stamps and (pending is not None or rec is not None):
                continue
            try:
                stamp = file_stamp(p)
            except OSError:
                continue
            known = pending[0] if pending is not None else rec.stamp if rec is not None else None
            if known != stamp:
                out.append((p, stamp))
        return out

    def add(self, path: str, stamp: tuple[int, int], idx: VideoIndex) -> None:
        self._pending[self.key(path)] = (stamp, idx)

    def update(self, paths: list[str], jobs: int = 1, check_stamps: bool = True,
               seal: tuple[int, int] = (0, 0)) -> int:  # fmt: skip
        """Build the missing (and, with `check_stamps`, stale) entries of `paths`, then append them as
        one segment (sealed for a list with stamp `seal`, if given); returns how many were built.

        With jobs > 1 and many entries to build, `jobs` spawned processes demux in parallel (spawn:
        the caller may hold CUDA). Files that cannot be indexed are skipped (the per-sample load
        reports them with their list line, and tries again).
        """
        stale = self.missing(paths, check_stamps)
        if jobs > 1 and len(stale) >= PARALLEL_FROM:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=jobs, mp_context=context, **pool_options()) as pool:
                results = list(pool.map(index_job, [p for p, _ in stale], chunksize=16))
        else:
            results = [index_job(p) for p, _ in stale]
        for (p, stamp), result in zip(stale, results, strict=True):
            if not isinstance(result, str):
                self.add(p, stamp, result)
                self.builds += 1
        self.save(seal)
        return len(stale)

    def save(self, seal: tuple[int, int] = (0, 0)) -> None:
        """Append the entries built in this process as one segment (and/or a seal), when there are any.

        A list folder that cannot be written gets its index in the user's cache instead
        (cache_path_for); when that fails too the entries stay in memory (forked workers inherit
        them, spawned ones receive them pickled) and it says so.
        """
        if not self._pending and seal == (0, 0):
            return
        target = self._file()
        for attempt in (target, self.fallback if target == self.path else self.path):
            try:
                _append(attempt, _encoded(self._pending), seal)
                break
            except OSError as e:
                if attempt != target:
                    log.warning("%s: cannot write the packet index (%s); kept in memory for this run",
                                self.path, e)  # fmt: skip
                    return
                log.info("%s: not writable (%s); packet index written to %s", attempt, e, self.fallback)
        self._pending = {}
        self.refresh()

    def compact(self, keep: Iterable[str] | None = None) -> int:
        """Rewrite the file as one segment with each key's newest entry (only the paths in `keep`, if
        given), keeping the seal; returns the entries written. Offline: readers keep the old file."""
        self.save()
        reader = self.reader()
        if reader is None:
            return 0
        wanted = None if keep is None else {self.key(p) for p in keep}
        with _locked(reader_path := self._file()):
            self.refresh()
            reader = self.reader()
            assert reader is not None
            records = list(reader.records())
            kept = sorted((h, blob) for h, blob in records if wanted is None or _record(blob).name in wanted)
            if len(reader.segments) > 1 or len(kept) < len(records):  # else it is compact already
                _write_new(reader_path, kept, reader.seal())
        self.refresh()
        return len(kept)


def index_job(path: str) -> VideoIndex | str:
    """For a process pool: the index of `path`, or why it cannot be built."""
    try:
        return build_video_index(path)
    except VideoReadError as e:
        return str(e)


def prepare_index(
    list_path: str | Path, paths: list[str], rank: int = 0, world: int = 1,
    barrier: Callable[[], None] | None = None, jobs: int = 1,
) -> tuple[PacketIndex, int]:  # fmt: skip
    """The list's index, complete, one build per job; returns it and how many entries this rank built.

    A list whose (size, mtime) matches the index's seal costs one stat, whatever its length. Otherwise
    rank r builds the missing entries of every world-th distinct path from r (appending its own segment),
    all ranks meet at `barrier` (called on every rank, always, so they cannot disagree about it), and
    rank 0 seals the index for this list. Stale entries are left to the per-sample check.
    """
    index = PacketIndex(index_path_for(list_path))
    stamp = file_stamp(str(list_path))
    built = 0
    if not index.sealed(stamp):
        built = index.update(list(dict.fromkeys(paths))[rank::world], jobs, check_stamps=False)
    if barrier is not None:
        barrier()
    if rank == 0 and not index.sealed(stamp):
        index.save(seal=stamp)
    index.refresh()
    return index, built


def main(argv: list[str] | None = None) -> int:
    """`python -m dali_pipes.packet_index compact INDEX [--list LIST]`: merge the segments into one."""
    parser = argparse.ArgumentParser(prog="python -m dali_pipes.packet_index", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    compact = sub.add_parser("compact", help="rewrite INDEX as one segment (readers keep the old file)")
    compact.add_argument("index", type=Path, help="LIST.index")
    compact.add_argument("--list", type=Path, help="keep only the videos of this list")
    args = parser.parse_args(argv)
    if not args.index.is_file():
        print(f"error: {args.index}: no such packet index", file=sys.stderr)
        return 2
    keep = None
    if args.list is not None:
        from .listfile import ListFileError, read_list

        try:
            keep = [e.path for e in read_list(str(args.list), "")]
        except (ListFileError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    index = PacketIndex(args.index)
    if index.reader() is None:
        print(f"error: {args.index}: not a readable format-{FORMAT} packet index", file=sys.stderr)
        return 2
    print(f"{args.index}: {index.compact(keep)} entries in one segment")
    return 0


if __name__ == "__main__":
    sys.exit(main())
