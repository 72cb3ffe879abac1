"""GOP trimming figures for docs/BENCHMARKS.md: its CPU cost per clip, and what it buys DALI's decoder.

    PYTHONPATH=. python scripts/bench_trim.py [--dir /tmp/trim_bench] [--clips 16] [--batches 4] [--repeats 2]

Makes 10 s 426x320 clips (VP9 GOP 16 in WebM; H.264 GOP 16 and GOP 250 with B-frames in MP4) once,
writes their packet index, then
1. times, per clip and in CPU time of this process, the index lookup (memory-mapped LIST.index) and
   `trim` for TSN train sampling (T=8), over every clip x 20 epochs;
2. runs the training loader on the VP9 clips with `cpu_decoder: dali` trim on, trim off, and the PyAV
   route, in this run, pinned to the same cores with the same threads and workers, in alternating
   order, and reports the mean clips/s beside CPU-ms per clip (this process and its workers).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dali_pipes.loader import build_loader, sampling_options
from dali_pipes.packet_index import PacketIndex, index_path_for
from dali_pipes.profile import tree_cpu_seconds
from dali_pipes.sampling import clip_indices
from dali_pipes.trim import trim
from engine.config import DataConfig
from prep.common import write_packet_index

SETS = {
    "vp9_gop16": ("webm", ["-c:v", "libvpx-vp9", "-b:v", "0", "-crf", "32", "-deadline", "realtime",
                           "-cpu-used", "8", "-g", "16", "-keyint_min", "16"]),
    "h264_gop16": ("mp4", ["-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-bf", "3", "-g", "16",
                           "-keyint_min", "16", "-sc_threshold", "0"]),
    "h264_gop250": ("mp4", ["-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-bf", "3", "-g", "250",
                            "-keyint_min", "250", "-sc_threshold", "0"]),
}  # fmt: skip


def make_set(root: Path, name: str, clips: int) -> Path:
    """`clips` 10 s 426x320 videos with moving content and their list + packet index."""
    ext, codec = SETS[name]
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(clips):
        path = folder / f"c{i:03d}.{ext}"
        if not path.exists():
            src = f"testsrc2=size=426x320:rate=25:duration=10,hue=h={37 * i},noise=alls=6:allf=t"
            cmd = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", src, *codec, "-pix_fmt", "yuv420p",
                   "-an", str(path)]  # fmt: skip
            subprocess.run(cmd, check=True)
        lines.append(f"{path.name} 250 {i % 4}\n")
    list_path = folder / "train.txt"
    list_path.write_text("".join(lines))
    write_packet_index(list_path, [str(folder / ln.split()[0]) for ln in lines], jobs=1, quiet=True)
    return list_path


def trim_cost(list_path: Path, epochs: int = 20) -> str:
    index = PacketIndex(index_path_for(list_path))
    paths = [str(list_path.parent / ln.split()[0]) for ln in list_path.read_text().splitlines()]
    opts = sampling_options(DataConfig(), None)
    lookup = cut = 0.0
    kept_packets = kept_bytes = all_packets = all_bytes = n = 0
    for epoch in range(epochs):
        for sid, path in enumerate(paths):
            t0 = time.process_time()
            fd = os.open(path, os.O_RDONLY)
            st = os.fstat(fd)
            idx = index.get(path, (st.st_size, st.st_mtime_ns))
            t1 = time.process_time()
            indices = clip_indices(idx.num_frames, "train", opts, 0, epoch, sid).ravel()
            data, _ = trim(path, idx, indices, fd)
            os.close(fd)
            t2 = time.process_time()
            lookup, cut, n = lookup + t1 - t0, cut + t2 - t1, n + 1
            kept_bytes, all_bytes = kept_bytes + len(data), all_bytes + st.st_size
            assert idx.packets is not None
            all_packets += len(idx.packets)
            ends = idx.frame_packet[indices]
            keys = np.nonzero(idx.packets["flags"] & 1)[0]
            starts = keys[np.searchsorted(keys, ends, side="right") - 1]
            kept_packets += len(set().union(*(range(s, e + 1) for s, e in zip(starts, ends, strict=True))))
    assert index.builds == 0, "the bench should read every entry from the index file"
    return (f"| {list_path.parent.name} | {n} | {1e3 * lookup / n:.3f} | {1e3 * cut / n:.3f} | "
            f"{1e3 * (lookup + cut) / n:.3f} | {kept_packets / n:.1f} of {all_packets / n:.0f} | "
            f"{kept_bytes / n / 1024:.0f} of {all_bytes / n / 1024:.0f} |")  # fmt: skip


def loader_run(list_path: Path, batches: int, **kw) -> tuple[float, float]:
    """(clips/s, CPU-ms per clip) of the train loader over `batches` batches after one warm-up."""
    cfg = DataConfig(train_list=str(list_path), device="cpu", input_size=224, scale_size=256, batch_size=8,
                     num_threads=2, num_workers=2, prefetch=2, **kw)  # fmt: skip
    loader = build_loader(cfg, "train")

    def forever():
        while True:
            yield from loader

    it = forever()
    next(it)  # pipeline build, worker start
    cpu0, t0 = tree_cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        next(it)
    wall, cpu = time.perf_counter() - t0, tree_cpu_seconds() - cpu0
    loader.close()
    clips = batches * cfg.batch_size
    return clips / wall, 1e3 * cpu / clips


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", type=Path, default=Path("/tmp/trim_bench"))
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--batches", type=int, default=4, help="timed loader batches of 8 clips per route")
    p.add_argument("--repeats", type=int, default=2, help="loader runs per route (order alternates)")
    args = p.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cores)  # workers inherit it: every route gets the same cores
    lists = {name: make_set(args.dir, name, args.clips) for name in SETS}
    print(f"cores {cores}; {args.clips} clips per set, 250 frames each, 426x320\n")
    print("| set | clips | index lookup ms | trim ms | CPU ms per clip | packets kept | KB kept |")
    print("|---|---|---|---|---|---|---|")
    for name in SETS:
        print(trim_cost(lists[name]))
    print("\n| route (VP9 GOP 16) | clips/s | CPU-ms per clip | vs PyAV clips/s |")
    print("|---|---|---|---|")
    routes = {"dali, trim on": {"cpu_decoder": "dali", "trim": "on"},
              "dali, trim off": {"cpu_decoder": "dali", "trim": "off"},
              "pyav": {"cpu_decoder": "pyav"}}  # fmt: skip
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in routes}
    order = list(routes)
    for r in range(args.repeats):  # alternate the order so drift on a shared machine hits every route
        for name in order if r % 2 == 0 else order[::-1]:
            runs[name].append(loader_run(lists["vp9_gop16"], args.batches, **routes[name]))
    results = {name: (float(np.mean([x[0] for x in v])), float(np.mean([x[1] for x in v])))
               for name, v in runs.items()}  # fmt: skip
    for name, (rate, cpu) in results.items():
        print(f"| {name} | {rate:.2f} | {cpu:.0f} | {rate / results['pyav'][0]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
