"""Threads or processes for the PyAV route's decoding, measured through the whole training loader.

    python scripts/bench_source_pool.py LIST [--batches 24] [--repeats 3] [--cores 0,1] [--threads 2]

`processes` is the loader as it is: DALI's parallel external source, `--threads` worker processes
running ClipSource (decode, crop, resize) and handing frames over in shared memory. `threads` is the
same ClipSource called from a pool of `--threads` threads inside the training process, through a
batch callback that keeps two batches in flight (PyAV releases the GIL while it decodes), into the
same DALI graph. Both are pinned to the same cores with the same thread budget; each repeat measures
both, interleaved, from an idle process tree to an idle one (dali_pipes.profile.settle). Prints CPU-ms
per clip (the whole tree) and clips/s per repeat and their medians. Train mode, 224 px, TSN T = 8.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _Info:
    """What DALI's parallel source passes to a per-sample callback."""

    def __init__(self, epoch_idx: int, idx_in_epoch: int) -> None:
        self.epoch_idx, self.idx_in_epoch = epoch_idx, idx_in_epoch


def threaded(loader, threads: int, ahead: int = 2):
    """The loader's pipeline rebuilt with its ClipSource run by a thread pool in this process."""
    from nvidia.dali import fn

    from dali_pipes.graph import clip_graph

    source, batch = loader.source, loader.batch
    pool, pending = ThreadPoolExecutor(threads), {}

    def batch_source(info):
        for it in range(info.iteration, info.iteration + ahead + 1):
            if (info.epoch_idx, it) not in pending:
                pending[info.epoch_idx, it] = [pool.submit(source, _Info(info.epoch_idx, it * batch + j))
                                               for j in range(batch)]  # fmt: skip
        samples = [f.result() for f in pending.pop((info.epoch_idx, info.iteration))]
        return [list(column) for column in zip(*samples, strict=True)]

    original = fn.external_source

    def batched(**kw):  # the graph's one external source, as a batch callback run in this process
        kw.update(source=batch_source, batch=True, batch_info=True, parallel=False)
        kw.pop("prefetch_queue_depth", None)
        return original(**kw)

    fn.external_source = batched
    try:
        data = loader.data
        pipe = clip_graph(source=source, device="cpu", num_crops=1, out_size=loader.out_size, mean=data.mean,
                          std=data.std, dtype=data.dtype, parallel=False, prefetch=data.prefetch,
                          batch_size=batch, num_threads=data.num_threads, device_id=None,
                          prefetch_queue_depth=data.prefetch, seed=data.seed, exec_dynamic=True)  # fmt: skip
    finally:
        fn.external_source = original
    pipe.build()
    loader._pipe, loader._pipe_at = pipe, (loader.epoch, loader.position)
    return pool


def measure(list_path: str, mode: str, batches: int, threads: int, cores: set[int]) -> tuple[float, float]:
    """(CPU-ms per clip of the process tree, clips/s) of `batches` batches after 2 untimed ones."""
    import torch

    from dali_pipes.loader import build_loader
    from dali_pipes.profile import endless, process_tree, settle
    from engine.config import load_config

    cfg = load_config("configs/demo.yaml", [
        f"--data.train_list={list_path}", "--data.input_size=224", "--data.scale_size=256",
        "--data.crop_scales=[1.0,0.875,0.75,0.66]", "--data.flip=on", "--data.batch_size=8",
        f"--data.num_workers={threads}", f"--data.num_threads={threads}"])  # fmt: skip
    # the workers' resize runs on one torch thread each (source._enter_worker); in the threads mode the
    # pool threads share this process's torch, so it gets one thread too
    torch.set_num_threads(1 if mode == "threads" else threads)
    loader = build_loader(cfg.data, "train")
    pool = threaded(loader, threads) if mode == "threads" else None
    it = endless(loader)
    for _ in range(2):
        next(it)
    tree = process_tree()
    cpu0, _, _ = settle(tree)
    start, clips = time.perf_counter(), 0
    for _ in range(batches):
        clips += len(next(it)["labels"])
    cpu, end, _ = settle(tree)
    loader.close()
    if pool is not None:
        pool.shutdown(cancel_futures=True)
    return 1000 * (cpu - cpu0) / clips, clips / (end - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("list")
    p.add_argument("--batches", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cores", default="0,1")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    cores = {int(c) for c in args.cores.split(",")}
    os.sched_setaffinity(0, cores)
    os.chdir(Path(__file__).resolve().parents[1])
    runs: dict[str, list[tuple[float, float]]] = {"processes": [], "threads": []}
    for k in range(args.repeats):
        for mode in runs:
            runs[mode].append(measure(args.list, mode, args.batches, args.threads, cores))
            cpu, speed = runs[mode][-1]
            print(f"repeat {k + 1} {mode}: {cpu:.1f} CPU-ms/clip, {speed:.1f} clips/s", flush=True)
    for mode, got in runs.items():
        cpus = [c for c, _ in got]
        speed = statistics.median(s for _, s in got)
        print(f"{mode}: median {statistics.median(cpus):.1f} CPU-ms/clip [{min(cpus):.1f}-{max(cpus):.1f}], "
              f"{speed:.1f} clips/s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
