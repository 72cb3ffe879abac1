"""CPU-ms per clip of the PyAV route's decode variants (where its speed-ups come from).

    python scripts/bench_pyav_decode.py LIST [--clips 16] [--cores 0,1] [--old-rev REV]

Pinned to --cores (default: all this process may use); FFmpeg's "auto" thread counts follow the
affinity, so pin to as many cores as a loader worker sees (2 in docs/BENCHMARKS.md).
For the first --clips lines of LIST (prep.lists format) and TSN T=8 train indices, measures per clip,
interleaved over 3 passes (median): dali_pipes.video_io.decode_frames as it is, the same with
skip_nonref=False, and (with --old-rev) the decode_frames of an earlier git revision; plus the RGB
conversion alone (frame.to_ndarray(format="rgb24") vs the reused single-thread reformatter) and the
straight decode per frame with each codec threading setting. With --pools: the same clips decoded by
2 threads of one process against 2 forked processes (frames pickled back, or nothing sent back), wall
clock and CPU-ms per clip of the whole process tree (the threads-vs-processes question for DALI's
parallel external source).
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import av
from av.video.reformatter import VideoReformatter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dali_pipes.loader import sampling_options  # noqa: E402
from dali_pipes.packet_index import build_video_index  # noqa: E402
from dali_pipes.sampling import clip_indices  # noqa: E402
from dali_pipes.video_io import decode_frames  # noqa: E402
from engine.config import DataConfig  # noqa: E402


def old_module(rev: str):
    text = subprocess.run(["git", "show", f"{rev}:dali_pipes/video_io.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "video_io_old.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("video_io_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["video_io_old"] = module
    spec.loader.exec_module(module)
    return module


_JOBS: list = []  # (path, indices, index) for the pool workers (inherited by fork)


def _decode(k: int):
    path, indices, index = _JOBS[k]
    return decode_frames(path, indices, index)


def _decode_drop(k: int) -> int:
    _decode(k)
    return 0


def _tree_cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def pools(jobs: list, index: dict) -> None:
    _JOBS[:] = [(path, i, index[path]) for path, i in jobs]
    ks = list(range(len(_JOBS)))
    kinds = {"2 threads": (ThreadPoolExecutor, _decode), "2 processes, frames sent back": (None, _decode),
             "2 processes, nothing sent back": (None, _decode_drop)}  # fmt: skip
    res: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    for _ in range(3):
        for name, (pool_type, fn) in kinds.items():
            cpu0, t0 = _tree_cpu(), time.perf_counter()
            pool = pool_type(2) if pool_type else ProcessPoolExecutor(2, mp_context=mp.get_context("fork"))
            list(pool.map(fn, ks))
            pool.shutdown()
            wall = time.perf_counter() - t0
            res[name].append((len(ks) / wall, 1000 * (_tree_cpu() - cpu0) / len(ks)))
    for name, v in res.items():
        rate, cpu = statistics.median(x for x, _ in v), statistics.median(y for _, y in v)
        print(f"  {name:32s} {rate:5.1f} clips/s  {cpu:6.1f} CPU-ms/clip (incl. pool start)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("list")
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--cores", default="", help="e.g. 0,1 (default: all)")
    p.add_argument("--old-rev", default="")
    p.add_argument("--pools", action="store_true", help="also: 2 threads vs 2 processes")
    args = p.parse_args(argv)
    cores = {int(c) for c in args.cores.split(",")} if args.cores else os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    base = Path(args.list).parent
    lines = [line.split() for line in Path(args.list).read_text().splitlines() if line.strip()][: args.clips]
    opts = sampling_options(DataConfig(), None)
    jobs = [(str(base / f), clip_indices(int(n), "train", opts, 0, 0, k).ravel())
            for k, (f, n, _) in enumerate(lines)]
    index = {path: build_video_index(path) for path, _ in jobs}  # the packet index, as the loader's
    variants = {
        "decode_frames (all speed-ups)": lambda path, i, s: decode_frames(path, i, index[path], stats=s),
        "decode_frames, skip_nonref=False": lambda path, i, s: decode_frames(
            path, i, index[path], skip_nonref=False, stats=s
        ),
    }
    if args.old_rev:
        old = old_module(args.old_rev)
        variants[f"decode_frames of {args.old_rev}"] = lambda path, i, s: old.decode_frames(
            path, i, index[path], stats=s
        )
    times: dict[str, list[float]] = {k: [] for k in variants}
    stats: dict[str, dict] = {k: {} for k in variants}
    for _ in range(3):
        acc = dict.fromkeys(variants, 0.0)
        for path, i in jobs:
            for name, fn in variants.items():
                t = time.process_time()
                fn(path, i, stats[name])
                acc[name] += time.process_time() - t
        for name in variants:
            times[name].append(1000 * acc[name] / len(jobs))
    print(f"{args.list}: {len(jobs)} clips, TSN T=8 train indices, cores {sorted(cores)}, median of 3 passes")
    for name in variants:
        s = stats[name]
        ratio = f"{s['decoded'] / s['kept']:.2f}" if s else "-"
        print(f"  {name:40s} {statistics.median(times[name]):6.1f} CPU-ms/clip   decoded/kept {ratio}")
    path = jobs[0][0]
    with av.open(path) as c:
        frames = [f for _, f in zip(range(40), c.decode(video=0), strict=False)]
    reformatter = VideoReformatter()
    conversions = {
        "frame.to_ndarray(format='rgb24')": lambda f: f.to_ndarray(format="rgb24"),
        "reused reformatter, threads=1": lambda f: reformatter.reformat(
            f, format="rgb24", threads=1
        ).to_ndarray(),
    }
    for name, conv in conversions.items():
        t = time.process_time()
        for f in frames:
            conv(f)
        ms = 1000 * (time.process_time() - t) / len(frames)
        print(f"  RGB conversion {name:36s} {ms:.3f} CPU-ms/frame")
    for thread_type, count in [("NONE", 1), ("SLICE", 0), ("FRAME", 2), ("AUTO", 0)]:
        with av.open(path) as c:
            stream = c.streams.video[0]
            stream.thread_type, stream.codec_context.thread_count = thread_type, count
            t, n = time.process_time(), 0
            for _ in c.decode(stream):
                n += 1
        print(f"  straight decode thread_type={thread_type} count={count}: "
              f"{1000 * (time.process_time() - t) / n:.3f} CPU-ms/frame")  # fmt: skip
    if args.pools:
        pools(jobs, index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
