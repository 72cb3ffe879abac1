"""One persistent packet index per video: built once by demuxing (no decoding), shared by every worker.

Per video: every packet of the first video stream in decode order (pts, dts, byte offset of the
payload in the file, size, keyframe / disposable / discard / recovery flags, payload CRC-32)
plus stream facts (codec, size, time base, codec extradata). The loader reads frame pts and keyframes
from it (PyAV route) and `trim` reads only the byte ranges it needs (DALI decoder route), so no sample
demuxes a file.

The index of a list lives beside it, `LIST.index`: a file of consecutive .npy records that every
process memory-maps (forked or spawned workers share the page cache; nothing is pickled or copied).
Entries are keyed by the video's path relative to the index file's folder, and carry the file's size
and mtime, so a changed file is detected and rebuilt. prep.lists and prep.validate write the index;
the loader builds whatever is missing or stale in its main process before the workers start. A list
in a read-only folder gets its index in the user's cache instead (cache_path_for).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
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
# (an open-GOP / recovery-point I-frame: decoding cannot start there).
# crc: CRC-32 of the payload, so the index's digest (dataset fingerprint) changes with any payload byte
PACKET = np.dtype([("pts", "<i8"), ("dts", "<i8"), ("offset", "<i8"), ("size", "<i4"), ("flags", "u1"),
                   ("crc", "<u4")])  # fmt: skip
META = np.dtype([
    ("file_size", "<i8"), ("mtime_ns", "<i8"), ("first", "<i8"), ("count", "<i8"), ("width", "<i4"),
    ("height", "<i4"), ("tb_num", "<i8"), ("tb_den", "<i8"), ("codec", "S16"),
    ("extra_first", "<i8"), ("extra_len", "<i8"), ("rotation", "<i2"),
])  # fmt: skip
FORMAT = 5  # bumped when the layout or meaning of the records changes; other formats are rebuilt
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
                rows.append((packet.pts, dts, offset, packet.size, flags, zlib.crc32(payload)))
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


def digest(codec: str, size: tuple[int, int], time_base: tuple[int, int], extradata: bytes,
           packets: np.ndarray) -> str:  # fmt: skip
    """SHA-1 of one video's index (what the decoders see of the file; the dataset fingerprint's unit)."""
    h = hashlib.sha1(f"{codec} {size[0]}x{size[1]} {time_base[0]}/{time_base[1]}".encode())
    h.update(extradata)
    h.update(np.ascontiguousarray(packets, PACKET).tobytes())
    return h.hexdigest()


def video_digest(index: VideoIndex) -> str:
    assert index.packets is not None
    return digest(index.codec, (index.width, index.height), index.time_base, index.extradata, index.packets)


# ---- the index file ----------------------------------------------------------------------------


@dataclass
class _Stored:
    names: dict[str, int]
    meta: np.ndarray
    packets: np.ndarray
    extradata: np.ndarray


def _read_records(path: Path) -> list[np.ndarray]:
    """The .npy records of an index file, memory-mapped (never copied into each worker)."""
    out = []
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        while f.tell() < end:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            start = f.tell()
            count = int(np.prod(shape)) if shape else 1
            if count == 0:
                out.append(np.zeros(shape, dtype))
            else:
                out.append(np.memmap(path, dtype=dtype, mode="r", offset=start, shape=shape,
                                     order="F" if fortran else "C"))  # fmt: skip
            f.seek(start + count * dtype.itemsize)
    return out


def _load(path: Path) -> _Stored | None:
    """The stored index, or None when there is none, or it is unreadable or of another format."""
    if not path.is_file():
        return None
    try:
        fmt, names_blob, name_ends, meta, packets, extradata = _read_records(path)
        if int(fmt[0]) != FORMAT or meta.dtype != META or packets.dtype != PACKET:
            return None
    except Exception as e:  # a damaged index is rebuilt, never trusted
        log.warning("%s: unreadable packet index (%s); rebuilding it", path, e)
        return None
    text = bytes(names_blob).decode("utf-8")
    starts = np.concatenate([[0], np.asarray(name_ends[:-1])]) if len(name_ends) else []
    names = {text[int(a) : int(b)]: i for i, (a, b) in enumerate(zip(starts, name_ends, strict=True))}
    return _Stored(names, meta, packets, extradata)


def _save(path: Path, items: dict[str, tuple[tuple[int, int], VideoIndex]]) -> None:
    """Write the whole index atomically (readers see the old or the new file, never a mix)."""
    names = sorted(items)
    encoded = [n.encode("utf-8") for n in names]
    meta = np.zeros(len(names), META)
    packet_parts, extra_parts = [], []
    first = extra_first = 0
    for i, name in enumerate(names):
        (size, mtime), idx = items[name]
        assert idx.packets is not None
        codec = idx.codec.encode("ascii", "replace")[:16]
        meta[i] = (size, mtime, first, len(idx.packets), idx.width, idx.height, idx.time_base[0],
                   idx.time_base[1], codec, extra_first, len(idx.extradata), idx.rotation)  # fmt: skip
        packet_parts.append(np.asarray(idx.packets, PACKET))
        extra_parts.append(np.frombuffer(idx.extradata, np.uint8))
        first += len(idx.packets)
        extra_first += len(idx.extradata)
    # name_ends are character offsets into the decoded text, which is what _load slices
    char_ends = np.cumsum([len(n) for n in names], dtype=np.int64) if names else np.zeros(0, np.int64)
    records = [
        np.array([FORMAT], np.int64),
        np.frombuffer(b"".join(encoded), np.uint8),
        char_ends,
        meta,
        np.concatenate(packet_parts) if packet_parts else np.zeros(0, PACKET),
        np.concatenate(extra_parts) if extra_parts else np.zeros(0, np.uint8),
    ]

    def write(f) -> None:
        for r in records:
            np.lib.format.write_array(f, np.ascontiguousarray(r), allow_pickle=False)

    atomic_write(path, write)


class PacketIndex:
    """The packet index of one list file: stored entries (memory-mapped) plus ones built since."""

    def __init__(self, index_file: str | Path) -> None:
        self.path = Path(index_file)
        self.base = self.path.parent  # keys are relative to the list's folder wherever the file lives
        self.fallback = cache_path_for(self.path)
        self._stored: _Stored | None = None
        self._loaded = False
        self._built: dict[str, tuple[tuple[int, int], VideoIndex]] = {}
        self.builds = 0  # entries demuxed by this process (tests check that a stored index is reused)

    def __getstate__(self) -> dict:  # workers memory-map the file themselves
        return {"path": self.path, "base": self.base, "_built": self._built}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])
        self._built = dict(state["_built"])

    def key(self, path: str) -> str:
        return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(self.base))).as_posix()

    def _file(self) -> Path:
        """The file to read: beside the list, or the cache copy when that one is newer."""
        present = [p for p in (self.path, self.fallback) if p.is_file()]
        return max(present, key=lambda p: p.stat().st_mtime_ns) if present else self.path

    def _store(self) -> _Stored | None:
        if not self._loaded:
            self._stored, self._loaded = _load(self._file()), True
        return self._stored

    def stored(self, path: str, stamp: tuple[int, int]) -> VideoIndex | None:
        """The entry for `path` if present and made from a file with this (size, mtime)."""
        key = self.key(path)
        built = self._built.get(key)
        if built is not None and built[0] == stamp:
            return built[1]
        store = self._store()
        i = store.names.get(key) if store is not None else None
        if i is None:
            return None
        m = store.meta[i]
        if (int(m["file_size"]), int(m["mtime_ns"])) != stamp:
            return None
        first, count = int(m["first"]), int(m["count"])
        extra = bytes(store.extradata[int(m["extra_first"]) : int(m["extra_first"]) + int(m["extra_len"])])
        index = _assemble(np.asarray(store.packets[first : first + count]), int(m["width"]),
                          int(m["height"]), m["codec"].decode("ascii"), (int(m["tb_num"]), int(m["tb_den"])),
                          extra, path)  # fmt: skip
        index.rotation = int(m["rotation"])
        return index

    def digest(self, path: str, stamp: tuple[int, int]) -> str:
        """video_digest of `path`'s entry, hashed straight from the stored records when they are current
        (no VideoIndex is assembled: fast over a whole list), else from the entry demuxed now."""
        store, key = self._store(), self.key(path)
        i = store.names.get(key) if store is not None and key not in self._built else None
        m = store.meta[i] if i is not None else None
        if m is not None and (int(m["file_size"]), int(m["mtime_ns"])) == stamp:
            first, extra = int(m["first"]), int(m["extra_first"])
            return digest(m["codec"].decode("ascii"), (int(m["width"]), int(m["height"])),
                          (int(m["tb_num"]), int(m["tb_den"])),
                          bytes(store.extradata[extra : extra + int(m["extra_len"])]),
                          store.packets[first : first + int(m["count"])])  # fmt: skip
        return video_digest(self.get(path, stamp))

    def get(self, path: str, stamp: tuple[int, int] | None = None) -> VideoIndex:
        """The index of `path`: stored when fresh, else demuxed now (and kept for this process)."""
        stamp = stamp or file_stamp(path)
        found = self.stored(path, stamp)
        if found is not None:
            return found
        idx = build_video_index(path)
        self.builds += 1
        self._built[self.key(path)] = (stamp, idx)
        return idx

    def missing(self, paths: list[str]) -> list[tuple[str, tuple[int, int]]]:
        """(path, stamp) of the files in `paths` without a current entry (missing files are skipped)."""
        out = []
        for p in dict.fromkeys(paths):
            try:
                stamp = file_stamp(p)
            except OSError:
                continue
            if self.stored(p, stamp) is None:
                out.append((p, stamp))
        return out

    def add(self, path: str, stamp: tuple[int, int], idx: VideoIndex) -> None:
        self._built[self.key(path)] = (stamp, idx)

    def update(self, paths: list[str], jobs: int = 1) -> int:
        """Build the missing or stale entries of `paths`, then save; returns how many were built.

        With jobs > 1 and many entries to build, `jobs` spawned processes demux in parallel (spawn:
        the caller may hold CUDA). Files that cannot be indexed are skipped (the per-sample load
        reports them with their list line, and tries again).
        """
        stale = self.missing(paths)
        if jobs > 1 and len(stale) >= PARALLEL_FROM:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=jobs, mp_context=context, **pool_options()) as pool:
                results = pool.map(index_job, [p for p, _ in stale], chunksize=16)
                for (p, stamp), result in zip(stale, results, strict=True):
                    if not isinstance(result, str):
                        self.add(p, stamp, result)
                        self.builds += 1
        else:
            for p, stamp in stale:
                try:
                    self.get(p, stamp)
                except VideoReadError:
                    continue
        self.save()
        return len(stale)

    def save(self) -> None:
        """Merge the entries built in this process into the file (atomically), when there are any.

        A list folder that cannot be written gets its index in the user's cache instead
        (cache_path_for); when that fails too the entries stay in memory (forked workers inherit
        them, spawned ones receive them pickled) and it says so.
        """
        if not self._built:
            return
        items: dict[str, tuple[tuple[int, int], VideoIndex]] = {}
        store = self._store()
        if store is not None:
            for name, i in store.names.items():
                stamp = (int(store.meta[i]["file_size"]), int(store.meta[i]["mtime_ns"]))
                if name not in self._built:
                    idx = self.stored(str(self.base / name), stamp)
                    if idx is not None:
                        items[name] = (stamp, idx)
        items.update(self._built)
        try:
            _save(self.path, items)
        except OSError as e:
            try:
                _save(self.fallback, items)
                log.info("%s: not writable (%s); packet index written to %s", self.path, e, self.fallback)
            except OSError as e2:
                log.warning("%s: cannot write the packet index (%s, %s); kept in memory for this run",
                            self.path, e, e2)  # fmt: skip
                return
        self._stored, self._loaded, self._built = None, False, {}


def index_job(path: str) -> VideoIndex | str:
    """For a process pool: the index of `path`, or why it cannot be built."""
    try:
        return build_video_index(path)
    except VideoReadError as e:
        return str(e)
