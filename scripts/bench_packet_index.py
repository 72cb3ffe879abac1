"""The packet index at Kinetics scale: a synthesized index of 240k videos x 300 packets, measured.

    python scripts/bench_packet_index.py [--entries 240000] [--packets 300] [--workers 8] [--real VIDEO ...]
    python scripts/bench_packet_index.py --real-list LIST [--jobs 2] [--workers 8]

Prints one table (docs/BENCHMARKS.md): bytes on disk per packet, build CPU (encoding and writing every
entry; demuxing real videos is measured separately with --real), open time, lookup time, memory of
forked workers after an epoch of random lookups, start-up per rank (sealed list; changed list), and an
appended segment. The synthetic tables imitate H.264 in MP4 after prep.resize: GOP 16 with B-frames
(reordered pts), 1/15360 time base, lognormal frame sizes (I 25 KB, P 6 KB, B 1.5 KB median) and an
AAC frame between most video packets (offset gaps of 170-480 bytes), as measured on ffmpeg's output.
Everything is written to a temporary folder and removed. With --real-list, the same table for a list of
real videos: its index is built into a temporary folder by demuxing every listed file (build CPU of this
process and its `--jobs` workers), sealed for a copy of the list, then measured the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dali_pipes import packet_index as pi  # noqa: E402
from dali_pipes.video_io import VideoIndex  # noqa: E402

REORDER = np.array([2, 5, 2, 3, 4, 2, 3, 4, 2, 3, 4, 2, 3, 4, 2, 3]) * 512  # pts - dts over a GOP of 16


def synthetic_table(n: int, rng: np.random.Generator) -> np.ndarray:
    """One video's packets in decode order (see the module docstring for the model)."""
    p = np.zeros(n, pi.PACKET)
    dts = np.arange(n, dtype=np.int64) * 512 - 1024
    gop = np.arange(n) % 16
    key = gop == 0
    ctts = np.tile(REORDER, n // 16 + 1)[:n]
    sizes = np.where(key, rng.lognormal(10.1, 0.3, n), np.where(ctts == 1024, rng.lognormal(8.7, 0.6, n),
                                                                 rng.lognormal(7.3, 0.7, n)))  # fmt: skip
    gaps = np.where(rng.random(n) < 0.9, rng.integers(170, 480, n), 0)
    p["dts"], p["pts"], p["size"] = dts, dts + ctts, sizes.astype(np.int64) + 1
    p["offset"] = np.cumsum(np.concatenate([[48], p["size"][:-1]]) + gaps)
    p["flags"] = np.where(key, pi.KEY, np.where(ctts == 1024, pi.DISPOSABLE, 0))
    return p


def names(count: int) -> list[str]:
    """Kinetics-like keys: train/<class>/<youtube id>_<start>_<end>.mp4."""
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
    ids = ["".join(rng.choices(alphabet, k=11)) for _ in range(count)]
    return [f"train/class_{i % 400:03d}/{ids[i]}_{i % 300:06d}_{i % 300 + 10:06d}.mp4" for i in range(count)]


def build(path: Path, keys: list[str], packets: int, seal: tuple[int, int]) -> float:
    """Encode and write every entry (one segment); returns the CPU seconds that took."""
    rng = np.random.default_rng(0)
    pool = [VideoIndex([], [], 426, 320, "h264", time_base=(1, 15360), extradata=bytes(41),
                       packets=synthetic_table(packets, rng), payload_hash=rng.bytes(16))
            for _ in range(500)]  # fmt: skip
    order = sorted((pi.key_hash(k), i) for i, k in enumerate(keys))
    cpu = time.process_time()
    records = ((h, pi._encode(keys[i], (10_000_000 + i, 1_600_000_000 * 10**9 + i), pool[i % len(pool)]))
               for h, i in order)  # fmt: skip
    pi._write_new(path, records, seal)
    return time.process_time() - cpu


def memory() -> dict[str, int]:
    """This process's Rss, Pss and private (clean + dirty) memory in KiB (/proc/self/smaps_rollup)."""
    out: dict[str, int] = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return {"rss": out["Rss"], "pss": out["Pss"], "private": out["Private_Clean"] + out["Private_Dirty"]}


def worker(index: pi.PacketIndex, paths: np.ndarray, lookups: int, seed: int, fd: int) -> None:
    """In a forked worker: memory after 1,000 lookups and after `lookups`, written to `fd`. The paths
    come from one numpy bytes array: reading it touches no Python object of the parent (whose refcount
    writes would copy pages and show up as the worker's private memory, as a list of str would)."""
    rng = random.Random(seed)
    marks = []
    for i in range(lookups):
        p = paths[rng.randrange(len(paths))].decode()
        rec = index._find(index.key(p))
        assert rec is not None and index.stored(p, rec.stamp) is not None
        if i + 1 in (1000, lookups):
            marks.append(memory())
    os.write(fd, json.dumps(marks).encode())
    os._exit(0)


def workers(index_file: Path, paths: np.ndarray, count: int, lookups: int) -> list[list[dict[str, int]]]:
    index = pi.PacketIndex(index_file)
    index.reader()  # opened before the fork, as a loader's main process may
    results = []
    for w in range(count):
        r, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            worker(index, paths, lookups, w, wfd)
        os.close(wfd)
        results.append((pid, r))
    out = []
    for pid, r in results:
        with os.fdopen(r, "rb") as f:
            out.append(json.loads(f.read()))
        os.waitpid(pid, 0)
    return out


def timed(fn, repeat: int) -> float:
    """Median CPU seconds of `fn()` over `repeat` calls (CPU, not wall: the machine may be shared)."""
    times = []
    for _ in range(repeat):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times)


def real_bytes(paths: list[str]) -> list[str]:
    lines = []
    for p in paths:
        cpu = time.process_time()
        idx = pi.build_video_index(p)
        demux = time.process_time() - cpu
        blob = pi._encode(os.path.basename(p), pi.file_stamp(p), idx)
        per_packet = len(blob) / len(idx.packets)
        lines.append(f"| real: {os.path.basename(p)} | {len(idx.packets)} packets, {idx.codec} | "
                     f"{per_packet:.2f} B/packet; demux {demux * 1e3:.0f} ms CPU |")  # fmt: skip
    return lines


def measure(index_file: Path, list_path: Path, paths: list[str], workers_n: int, lookups: int) -> list[str]:
    """The rows every index gets: memory and time to open, lookup and decode, forked workers' memory
    over their lookups, start-up per rank (sealed list; a 1/workers share looked up)."""
    rows = []
    def open_index() -> None:
        pi.PacketIndex(index_file).reader()

    held = [memory()]
    kept = pi.PacketIndex(index_file)
    kept.reader()
    held.append(memory())
    rows.append(f"| open: memory added to the process | private / RSS | "
                f"{(held[1]['private'] - held[0]['private']) / 1024:.2f} / "
                f"{(held[1]['rss'] - held[0]['rss']) / 1024:.2f} MiB |")  # fmt: skip
    opened = timed(open_index, 20)
    rows.append(f"| open | PacketIndex(...).reader(), warm page cache | {opened * 1e3:.2f} ms CPU |")
    index = pi.PacketIndex(index_file)
    rng = random.Random(1)
    sample = [paths[rng.randrange(len(paths))] for _ in range(10_000)]
    recs = {p: index._find(index.key(p)) for p in sample[:100]}
    stamps = {p: r.stamp for p, r in recs.items()}

    def find_all() -> None:
        for p in sample:
            index._find(index.key(p))

    def stored_all() -> None:
        for p in sample[:100] * 20:
            index.stored(p, stamps[p])

    table = index.stored(sample[0], stamps[sample[0]]).packets

    def assemble_all() -> None:
        for _ in range(2000):
            pi._assemble(table, 426, 320, "h264", (1, 15360), b"", "x.mp4")

    find = timed(find_all, 3) / len(sample)
    assemble = timed(assemble_all, 3) / 2000
    full = timed(stored_all, 3) / 2000
    rows.append(f"| lookup | key -> record (binary search + pread), random keys | "
                f"{find * 1e6:.1f} µs CPU |")  # fmt: skip
    rows.append(f"| lookup + decode | key -> VideoIndex (packets, frame order, keyframes) | "
                f"{full * 1e6:.1f} µs CPU |")  # fmt: skip
    rows.append(f"| of which frame order | _assemble: pts sort, keyframes, lists (as in format 4) | "
                f"{assemble * 1e6:.1f} µs CPU |")  # fmt: skip

    marks = workers(index_file, np.array([p.encode() for p in paths]), workers_n, lookups)
    for label, at in (("after 1,000 lookups", 0), (f"after {lookups:,} lookups", 1)):
        rss = statistics.mean(m[at]["rss"] for m in marks) / 1024
        pss = statistics.mean(m[at]["pss"] for m in marks) / 1024
        private = statistics.mean(m[at]["private"] for m in marks) / 1024
        rows.append(f"| {workers_n} forked workers, {label} | mean per worker | "
                    f"RSS {rss:.1f} MiB, PSS {pss:.1f} MiB, private {private:.1f} MiB |")  # fmt: skip

    def sealed_start() -> None:
        assert pi.prepare_index(list_path, paths, 0, 1)[1] == 0

    rows.append(f"| start-up per rank, list sealed | prepare_index (one stat) | "
                f"{timed(sealed_start, 5) * 1e3:.2f} ms CPU |")  # fmt: skip
    share = paths[:: workers_n]
    cpu = time.process_time()
    assert pi.PacketIndex(index_file).missing(share, check_stamps=False) == []
    rows.append(f"| start-up per rank, list changed | lookups of a 1/{workers_n} share "
                f"({len(share):,} keys), no stat | {time.process_time() - cpu:.2f} s CPU |")  # fmt: skip

    return rows


def real_list_rows(list_file: Path, jobs: int, workers_n: int, lookups: int) -> list[str]:
    """The table for the videos of a real list, indexed from scratch in a temporary folder."""
    from dali_pipes.listfile import read_list

    entries = read_list(str(list_file))
    with tempfile.TemporaryDirectory(prefix="bench_packet_index.") as tmp:
        list_path = Path(tmp) / "list.txt"  # absolute paths: the index is written here, not by the list
        list_path.write_text("".join(f"{e.path} {e.num_frames} {e.label}\n" for e in entries))
        paths = [e.path for e in entries]
        index_file = pi.index_path_for(list_path)
        cpu = time.process_time()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        built = pi.PacketIndex(index_file).update(paths, jobs, seal=pi.file_stamp(str(list_path)))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        waited = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
        build = time.process_time() - cpu + waited
        index = pi.PacketIndex(index_file)
        packets = sum(len(index.get(p).packets) for p in paths)
        size = index_file.stat().st_size
        codecs = sorted({index.get(p).codec for p in paths})
        rows = [f"| real index | {len(paths):,} videos ({', '.join(codecs)}), {packets / len(paths):.0f} "
                f"packets each on average | {size / 2**20:,.2f} MiB, {size / packets:.2f} B/packet; build "
                f"(demux {built:,} files with {jobs} processes + write) {build:.1f} s CPU |"]  # fmt: skip
        rows += measure(index_file, list_path, paths, workers_n, lookups)
    return rows


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--entries", type=int, default=240_000)
    parser.add_argument("--packets", type=int, default=300)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--lookups", type=int, default=10_000, help="random lookups per worker")
    parser.add_argument("--real", nargs="*", default=[], help="videos to index for bytes and demux CPU")
    parser.add_argument("--real-list", type=Path, help="measure the index of a list of real videos instead")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="--real-list: demux processes")
    args = parser.parse_args()
    lookups = args.lookups
    if args.real_list:
        print("| what | how | measured |\n|---|---|---|")
        print("\n".join(real_list_rows(args.real_list, args.jobs, args.workers, lookups)))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_packet_index.") as tmp:
        folder = Path(tmp)
        keys = names(args.entries)
        list_path = folder / "train.txt"
        list_path.write_text("".join(f"{k} {args.packets} {i % 400}\n" for i, k in enumerate(keys)))
        paths = [str(folder / k) for k in keys]
        index_file = pi.index_path_for(list_path)
        cpu = build(index_file, keys, args.packets, pi.file_stamp(str(list_path)))
        size = index_file.stat().st_size
        rows.append(f"| synthesized index | {args.entries:,} videos x {args.packets} packets | "
                    f"{size / 2**20:,.0f} MiB, {size / (args.entries * args.packets):.2f} B/packet; "
                    f"build (encode + write) {cpu:.1f} s CPU |")  # fmt: skip

        rows += measure(index_file, list_path, paths, args.workers, lookups)

        before = index_file.read_bytes()[pi.FILE_HEAD.size : pi.FILE_HEAD.size + 2**20]
        table = synthetic_table(args.packets, np.random.default_rng(9))
        video = VideoIndex([], [], 426, 320, "h264", time_base=(1, 15360), packets=table)
        extra = {f"new/{k}": ((1, 1), video) for k in keys[:1000]}
        t = time.perf_counter()
        pi._append(index_file, pi._encoded(extra), (0, 0))
        append = time.perf_counter() - t
        assert index_file.read_bytes()[pi.FILE_HEAD.size : pi.FILE_HEAD.size + 2**20] == before
        rows.append(f"| append 1,000 videos | one segment, nothing rewritten | {append:.2f} s |")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows.append(f"| the bench's peak RSS | its own lists of keys and paths included | {peak:.0f} MiB |")
    rows += real_bytes(args.real)
    print("| what | how | measured |\n|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
