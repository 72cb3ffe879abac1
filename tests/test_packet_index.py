"""The packet index file at Kinetics scale (dali_pipes/packet_index.py): exact delta coding, append-only
segments with a commit, compaction, the per-sample stamp check, and one build per job across ranks."""

from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import dali_pipes.packet_index as packet_index
from dali_pipes.packet_index import (
    FILE_HEAD,
    FLAG_BITS,
    KEY,
    NO_OFFSET,
    PACKET,
    PacketIndex,
    _decode,
    _encode,
    _record,
    build_video_index,
    index_path_for,
    prepare_index,
    video_digest,
)
from dali_pipes.video_io import VideoIndex
from tests.conftest import write_clip

W, H = 64, 48


def _table(n: int, rng: np.random.Generator, offsets: str = "real") -> np.ndarray:
    """A packet table with B-frame reordering, varied sizes and offset gaps (audio between packets)."""
    p = np.zeros(n, PACKET)
    dts = np.arange(n, dtype=np.int64) * 1001 - 2002
    p["dts"] = dts
    p["pts"] = dts + rng.choice([0, 1001, 3003], n)
    p["size"] = rng.integers(1, 200_000, n)
    gaps = rng.integers(0, 5000, n) * (rng.random(n) < 0.3)
    p["offset"] = np.cumsum(np.concatenate([[4096], p["size"][:-1]]) + gaps)
    if offsets == "none":
        p["offset"] = NO_OFFSET
    elif offsets == "mixed":
        p["offset"][::3] = NO_OFFSET
    p["flags"] = rng.integers(0, 1 << FLAG_BITS, n)  # key, disposable, discard, recovery: all kept
    p["flags"][0] = KEY
    return p


def _video(packets: np.ndarray, extradata: bytes = b"\x01\x64\x00\x1f\xff") -> VideoIndex:
    return VideoIndex([], [], 426, 320, "h264", time_base=(1, 30000), extradata=extradata, packets=packets,
                      payload_hash=bytes(range(16)))  # fmt: skip


@pytest.mark.parametrize("n", [1, 2, 17, 300])
@pytest.mark.parametrize("offsets", ["real", "none", "mixed"])
def test_records_decode_to_the_exact_packets(n, offsets):
    packets = _table(n, np.random.default_rng(n), offsets)
    blob = _encode("a/b c.mp4", (123, 456), _video(packets))
    rec = _record(blob)
    assert rec.name == "a/b c.mp4" and rec.stamp == (123, 456)
    back = _decode(rec, "x.mp4")
    assert np.array_equal(back.packets, packets)
    assert (back.width, back.height, back.codec, back.time_base) == (426, 320, "h264", (1, 30000))
    assert back.extradata == b"\x01\x64\x00\x1f\xff" and back.payload_hash == bytes(range(16))


def test_a_regular_table_costs_a_few_bytes_per_packet():
    """Constant dts steps, periodic reordering, sizes < 64 KiB: ~5 bytes per packet with the record head."""
    rng = np.random.default_rng(0)
    packets = _table(300, rng)
    packets["size"] = rng.integers(500, 60_000, 300)
    packets["offset"] = np.cumsum(np.concatenate([[48], packets["size"][:-1]]) + 8)
    assert len(_encode("k400/abc_000010_000020.mp4", (1, 2), _video(packets))) / 300 < 5.5


def _clips(folder: Path, count: int, start: int = 0) -> list[str]:
    return [str(write_clip(folder / f"v{i}.webm", 12 + i, W, H, seed=i)) for i in range(start, start + count)]


def test_appends_never_rewrite_and_compaction_merges(tmp_path, ffmpeg_available):
    paths = _clips(tmp_path, 4)
    index_file = tmp_path / "list.txt.index"
    assert PacketIndex(index_file).update(paths[:2]) == 2
    before = index_file.read_bytes()
    assert PacketIndex(index_file).update(paths) == 2  # only the two new ones
    after = index_file.read_bytes()
    assert after[FILE_HEAD.size : len(before)] == before[FILE_HEAD.size :]  # the first segment untouched
    index = PacketIndex(index_file)
    assert len(index.reader().segments) == 2
    assert [index.get(p).num_frames for p in paths] == [12, 13, 14, 15] and index.builds == 0
    assert index.compact(keep=paths[1:]) == 3
    merged = PacketIndex(index_file)
    assert len(merged.reader().segments) == 1
    assert merged.stored(paths[0], packet_index.file_stamp(paths[0])) is None
    assert [merged.get(p).num_frames for p in paths[1:]] == [13, 14, 15] and merged.builds == 0


def test_a_torn_append_is_ignored_and_overwritten(tmp_path, ffmpeg_available):
    paths = _clips(tmp_path, 2)
    index_file = tmp_path / "list.txt.index"
    PacketIndex(index_file).update(paths[:1])
    with open(index_file, "ab") as f:  # a writer killed before its commit: bytes past the committed end
        f.write(os.urandom(5000))
    index = PacketIndex(index_file)
    assert index.get(paths[0]).num_frames == 12 and index.builds == 0
    assert index.update(paths) == 1
    again = PacketIndex(index_file)
    assert [again.get(p).num_frames for p in paths] == [12, 13] and again.builds == 0


@pytest.mark.parametrize("old", ["npy", "format5"])
def test_an_index_of_another_format_is_replaced(tmp_path, ffmpeg_available, old):
    """Formats 4/5 of .npy records, and format 5 of this layout (3 flag bits, no payload hash)."""
    paths = _clips(tmp_path, 1)
    index_file = tmp_path / "list.txt.index"
    if old == "npy":
        index_file.write_bytes(b"\x93NUMPY old format" + bytes(100))
    else:
        index_file.write_bytes(FILE_HEAD.pack(packet_index.MAGIC, 5, FILE_HEAD.size, 0))
    index = PacketIndex(index_file)
    assert index.reader() is None and index.update(paths) == 1
    assert PacketIndex(index_file).get(paths[0]).num_frames == 12


def test_a_changed_video_is_demuxed_where_it_is_read(tmp_path, ffmpeg_available, caplog, monkeypatch):
    """Stamps are checked per sample (start-up stats nothing); the rebuilt entry stays in a bounded cache."""
    paths = _clips(tmp_path, 2)
    index_file = tmp_path / "list.txt.index"
    PacketIndex(index_file).update(paths)
    write_clip(Path(paths[1]), 20, W, H, seed=7)
    os.utime(paths[1], ns=(10**18, 10**18))
    index = PacketIndex(index_file)
    assert index.missing(paths, check_stamps=False) == []  # start-up does not look at files
    assert index.get(paths[1]).num_frames == 20 and index.builds == 1
    assert "changed since its packet index entry was written" in caplog.text
    monkeypatch.setattr(packet_index, "RECENT", 1)
    index.get(paths[0], (1, 1))  # another changed stamp pushes the first out of the cache
    assert len(index._recent) == 1
    assert index.missing(paths) == [(paths[1], packet_index.file_stamp(paths[1]))]  # the offline check


def test_one_build_per_job_across_ranks(tmp_path, ffmpeg_available, monkeypatch):
    """Two ranks (threads) with a real barrier: every video is demuxed once in all, the index is sealed
    for the list, and the next job starts without a single lookup."""
    paths = _clips(tmp_path, 5)
    list_path = tmp_path / "list.txt"
    list_path.write_text("".join(f"v{i}.webm {12 + i} 0\n" for i in range(5)))
    demuxed: Counter[str] = Counter()
    real = packet_index.build_video_index

    def counting(path: str):
        demuxed[path] += 1
        return real(path)

    monkeypatch.setattr(packet_index, "build_video_index", counting)
    barrier = threading.Barrier(2, timeout=60)
    built: dict[int, int] = {}

    def rank(r: int) -> None:
        built[r] = prepare_index(list_path, paths + paths[:2], r, 2, barrier.wait)[1]

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert built == {0: 3, 1: 2} and sorted(demuxed) == sorted(paths) and set(demuxed.values()) == {1}
    index = PacketIndex(index_path_for(list_path))
    assert index.sealed(packet_index.file_stamp(str(list_path)))
    assert [index.get(p).num_frames for p in paths] == [12, 13, 14, 15, 16]

    def no_lookup(self, key):
        raise AssertionError(f"looked up {key} although the index is sealed for this list")

    monkeypatch.setattr(PacketIndex, "_find", no_lookup)
    assert prepare_index(list_path, paths, 0, 1)[1] == 0
    list_path.write_text(list_path.read_text() + "# a comment: the list changed\n")
    monkeypatch.undo()
    monkeypatch.setattr(packet_index, "build_video_index", counting)
    assert prepare_index(list_path, paths, 0, 1)[1] == 0 and set(demuxed.values()) == {1}


def test_compact_command_line(tmp_path, ffmpeg_available, capsys):
    paths = _clips(tmp_path, 2)
    index_file = tmp_path / "list.txt.index"
    PacketIndex(index_file).update(paths[:1])
    PacketIndex(index_file).update(paths)
    assert packet_index.main(["compact", str(index_file)]) == 0
    assert "2 entries in one segment" in capsys.readouterr().out
    assert len(PacketIndex(index_file).reader().segments) == 1
    assert packet_index.main(["compact", str(tmp_path / "nothing.index")]) == 2
    assert "nothing.index: no such packet index" in capsys.readouterr().err


def test_opening_creates_nothing_per_entry(tmp_path):
    """20,000 entries: open allocates a few KB of Python memory (a dict of the keys alone would be MBs),
    and any key is found."""
    import tracemalloc

    video = _video(_table(30, np.random.default_rng(0)))
    keys = [f"train/c{i % 7}/{i:08d}.mp4" for i in range(20_000)]
    records = sorted((packet_index.key_hash(k), _encode(k, (i, i), video)) for i, k in enumerate(keys))
    index_file = tmp_path / "list.txt.index"
    packet_index._write_new(index_file, records, (0, 0))
    index = PacketIndex(index_file)
    tracemalloc.start()
    try:
        assert index.reader() is not None
        allocated = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert allocated < 32_000, allocated
    for i in (0, 12_345, 19_999):
        found = index.stored(str(tmp_path / keys[i]), (i, i))
        assert found is not None and np.array_equal(found.packets, video.packets)
    assert index.stored(str(tmp_path / "train/c0/missing.mp4"), (0, 0)) is None


def test_digest_from_the_file_is_the_fresh_builds_and_sees_the_payload(tmp_path, ffmpeg_available):
    """PacketIndex.digest reads the stored record (no demux) and equals the digest of a fresh build; a
    payload byte changed (same size, same stamp) changes the payload hash and so the digest."""
    (video,) = _clips(tmp_path, 1)
    index = PacketIndex(index_path_for(tmp_path / "list.txt"))
    index.update([video])
    fresh = build_video_index(video)
    reader = PacketIndex(index.path)
    assert reader.digest(video, packet_index.file_stamp(video)) == video_digest(fresh)
    assert reader.builds == 0
    packets = fresh.packets
    assert packets is not None and (packets["offset"] >= 0).all()
    data = bytearray(Path(video).read_bytes())
    data[int(packets["offset"][1] + packets["size"][1] // 2)] ^= 0xFF
    st = os.stat(video)
    Path(video).write_bytes(bytes(data))
    os.utime(video, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same stamp: the stored record is used
    changed = build_video_index(video)
    assert np.array_equal(changed.packets, packets) and changed.payload_hash != fresh.payload_hash
    assert video_digest(changed) != video_digest(fresh)


def test_keys_of_videos_outside_the_list_folder(tmp_path):
    """Keys are paths relative to the list's folder, `../` included for a list kept apart from the data;
    the folder's prefix is computed once per folder (relpath per lookup cost 15 µs), bounded."""
    index = PacketIndex(tmp_path / "lists" / "train.txt.index")
    inside = tmp_path / "lists" / "sub" / "a.mp4"
    outside = [tmp_path / "data" / f"c{i % 3}" / f"v{i}.mp4" for i in range(9)] + [Path("/elsewhere/x.webm")]
    for p in [inside, *outside]:
        want = Path(os.path.relpath(os.path.abspath(p), tmp_path / "lists")).as_posix()
        assert index.key(str(p)) == want
    assert index.key(str(inside)) == "sub/a.mp4" and index.key(str(outside[0])) == "../data/c0/v0.mp4"
    assert len(index._rel_dirs) == 4  # c0, c1, c2 and /elsewhere: one entry per folder
