"""Throughput profiler: `python -m dali_pipes.profile CONFIG [--batches N] [--baseline pyav|decord|...]`
(plus `--decoders pyav,dali`, `--repeats R` and dotted overrides).

Measures the training loader of CONFIG (train list, train sampling and augmentation) for every
decoder route asked for (`--decoders pyav,dali` on CPU), and with --baseline the same clips through a
standalone CPU loader (torch DataLoader with data.num_workers workers: decode, crop, resize, flip,
normalise in torch) on the same data, in the same run, with the ratio. Dotted overrides
(`--data.batch_size=16`) apply to the config. The first --warmup batches (pipeline build, worker
start) are not timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from engine.config import ConfigError, DataConfig, DefaultsHelpFormatter, load_config, split_cli

from .listfile import ListFileError, read_list
from .loader import ClipLoader, build_loader, sampling_options
from .sampling import clip_indices
from .source import ClipSource, SpatialOptions, epoch_order
from .video_io import decode_frames


def cpu_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine from /proc/stat (workers are other processes)."""
    with open("/proc/stat") as f:
        values = [float(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process and its live descendants (DALI / DataLoader workers).

    Unlike the machine-wide figure this is not inflated by other jobs on a shared machine.
    """
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parents[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        pid = frontier.pop()
        kids = [c for c, p in parents.items() if p == pid and c not in tree]
        tree.update(kids)
        frontier += kids
    ticks = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


def gpu_stats() -> str:
    """GPU memory in use and NVDEC load, when pynvml can see a GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30
        dec = pynvml.nvmlDeviceGetDecoderUtilization(handle)[0]
        return f"{mem:.1f} GiB, NVDEC {dec}%"
    except Exception:
        if torch.cuda.is_available():
            return f"{torch.cuda.max_memory_reserved() / 2**30:.1f} GiB (torch; pynvml for NVDEC)"
        return "-"


@dataclasses.dataclass
class Result:
    name: str
    clips: int
    frames: int
    seconds: float
    cpu: float
    cores: float = 0.0  # CPU cores used by this process tree
    gpu: str = "-"
    error: str = ""

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.seconds if self.seconds else 0.0


def timed(
    name: str, batches: Iterable, warmup: int, count: int, clips_of: Callable, frames_per_clip: int
) -> Result:
    """Time `count` batches after `warmup` untimed ones."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    busy0, total0 = cpu_busy()
    own0 = tree_cpu_seconds()
    start, clips = time.perf_counter(), 0
    for _ in range(count):
        clips += clips_of(next(it))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    cores = (tree_cpu_seconds() - own0) / seconds
    busy1, total1 = cpu_busy()
    cpu = 100.0 * (busy1 - busy0) / max(total1 - total0, 1.0)
    return Result(name, clips, clips * frames_per_clip, seconds, cpu, cores, gpu_stats())


def endless(loader: ClipLoader):
    while True:
        yield from loader


# ---- the standalone baseline --------------------------------------------------------------------


def baseline_decoder(name: str) -> Callable[[str, np.ndarray], np.ndarray]:
    """Frame-accurate decode -> uint8 (n, H, W, 3) with the named library."""
    if name == "pyav":
        return decode_frames
    if name == "decord":
        import decord

        return lambda path, idx: decord.VideoReader(path, num_threads=1).get_batch(list(idx)).asnumpy()
    if name == "torchcodec":
        from torchcodec.decoders import VideoDecoder

        def decode(path: str, idx: np.ndarray) -> np.ndarray:
            frames = VideoDecoder(path).get_frames_at([int(i) for i in idx]).data
            return frames.permute(0, 2, 3, 1).numpy()

        return decode
    raise ValueError(f"unknown baseline {name!r}")


class BaselineDataset(torch.utils.data.Dataset):
    """The loader's train sampling and crops, done per item in a DataLoader worker with torch ops."""

    def __init__(self, data: DataConfig, decoder: str, epoch: int = 0) -> None:
        self.entries = read_list(data.train_list, data.root)
        self.data, self.decoder_name, self.epoch = data, decoder, epoch
        n = len(self.entries)
        self.order = epoch_order(n, "train", data.seed, epoch, 0, 1, data.batch_size, data.uneven)
        self.opts = sampling_options(data, None)
        spatial = SpatialOptions.from_config(data)
        self.spatial = ClipSource(
            self.entries, "pyav", "train", self.opts, spatial, data.seed, 0, 1, data.batch_size
        )
        self.mean = torch.tensor(data.mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(data.std).view(1, 3, 1, 1) * 255

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        sid = int(self.order[k])
        entry = self.entries[sid]
        idx = clip_indices(entry.num_frames, "train", self.opts, self.data.seed, self.epoch, sid).ravel()
        frames = torch.from_numpy(baseline_decoder(self.decoder_name)(entry.path, idx))
        h, w = frames.shape[1:3]
        rois, mirror, label = self.spatial.spatial_params(w, h, entry.label, self.epoch, sid)
        y0, x0, y1, x1 = rois[0]
        crop = frames[:, round(y0 * h) : round(y1 * h), round(x0 * w) : round(x1 * w)].permute(0, 3, 1, 2)
        size = self.data.input_size
        x = F.interpolate(crop.float(), size=(size, size), mode="bilinear", antialias=True)
        if int(mirror):
            x = x.flip(-1)
        return (x - self.mean) / self.std, label


def baseline_loader(data: DataConfig, decoder: str) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        BaselineDataset(data, decoder), batch_size=data.batch_size, num_workers=data.num_workers,
        persistent_workers=data.num_workers > 0, prefetch_factor=data.prefetch if data.num_workers else None,
    )  # fmt: skip


def endless_torch(loader: torch.utils.data.DataLoader):
    while True:
        yield from loader


# ---- main ---------------------------------------------------------------------------------------


def profile(
    data: DataConfig, decoders: list[str], baselines: list[str], batches: int, warmup: int
) -> list[Result]:
    results = []
    fpc = sampling_options(data, None).frames_per_clip
    for decoder in decoders:
        cfg = dataclasses.replace(data, cpu_decoder=decoder) if data.device == "cpu" else data
        route = f"DALI {data.device}" + (f" ({decoder} decode)" if data.device == "cpu" else " (NVDEC)")
        if data.source == "frames":
            route = f"DALI {data.device} (JPEG folders)"
        try:
            loader = build_loader(cfg, "train", device_id=0 if data.device == "gpu" else None)
            results.append(timed(route, endless(loader), warmup, batches, lambda b: len(b["labels"]), fpc))
            loader.close()
        except Exception as e:
            results.append(Result(route, 0, 0, 0.0, 0.0, error=str(e).splitlines()[0][:240]))
        if data.source == "frames":
            break
    for name in baselines:
        label = f"DataLoader + {name} ({data.num_workers} workers)"
        if name != "pyav" and importlib.util.find_spec(name) is None:
            results.append(Result(label, 0, 0, 0.0, 0.0, error=f"skipped: {name} is not importable"))
            continue
        try:
            results.append(timed(label, endless_torch(baseline_loader(data, name)), warmup, batches,
                                 lambda b: len(b[1]), fpc))  # fmt: skip
        except Exception as e:
            results.append(Result(label, 0, 0, 0.0, 0.0, error=str(e).splitlines()[0][:240]))
    return results


def median_result(runs: list[Result]) -> Result:
    """The run with the median clips/s (routes alternate within a repeat, so load drifts hit all)."""
    if any(r.error for r in runs):
        return next(r for r in runs if r.error)
    return sorted(runs, key=lambda r: r.clips_per_s)[len(runs) // 2]


def render(results: list[Result], title: str, console: Console) -> None:
    table = Table(title=title)
    columns = ("route", "clips/s", "decoded frames/s", "loader CPU (cores)", "CPU util (machine)",
               "GPU mem / NVDEC", "vs baseline")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col == "route" else "right")
    base = next((r for r in results if r.name.startswith("DataLoader") and not r.error), None)
    for r in results:
        if r.error:
            table.add_row(r.name, "-", "-", "-", "-", "-", f"[red]{r.error}[/red]")
            continue
        ratio = f"{r.clips_per_s / base.clips_per_s:.2f}x" if base and base.clips_per_s else "-"
        fps = f"{r.frames / r.seconds:.0f}"
        table.add_row(r.name, f"{r.clips_per_s:.1f}", fps, f"{r.cores:.2f}", f"{r.cpu:.0f}%", r.gpu, ratio)
    console.print(table)


def save_plot(results: list[Result], title: str, path: str) -> None:
    """The result table as a bar chart of clips/s per route (a failed route is a labelled gap)."""
    from engine.fileio import atomic_write
    from engine.plot import plot_throughput

    names = [r.name for r in results]
    rates = [0.0 if r.error else r.clips_per_s for r in results]
    cores = [0.0 if r.error else r.cores for r in results]
    errors = [r.error for r in results]
    atomic_write(path, lambda f: plot_throughput(names, rates, cores, title, f, errors))
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = split_cli(argv)
    parser = argparse.ArgumentParser(
        prog="python -m dali_pipes.profile", description=__doc__.splitlines()[0],
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("config")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per route")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first (build, worker start)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per route (median reported)")
    parser.add_argument("--baseline", action="append", choices=["pyav", "decord", "torchcodec"], default=[],
                        help="standalone CPU loader(s) to compare with (repeatable)")  # fmt: skip
    parser.add_argument("--decoders", default="", help="cpu routes: pyav,dali (default: data.cpu_decoder)")
    parser.add_argument("--plot", metavar="PATH", help="also save the table as a bar chart (PNG)")
    args = parser.parse_args(rest)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = cfg.data
    decoders = [d for d in args.decoders.split(",") if d] or [data.cpu_decoder]
    for d in decoders:
        if d not in ("pyav", "dali"):
            print(f"error: --decoders: {d!r} is not pyav or dali", file=sys.stderr)
            return 2
    console = Console(width=150)
    try:
        n = len(read_list(data.train_list, data.root))
    except ListFileError as e:
        print(f"error: data.train_list: {e}", file=sys.stderr)
        return 2
    fpc = sampling_options(data, None).frames_per_clip
    title = (f"{data.train_list}: {n} videos, {data.sampling} T={fpc}, batch {data.batch_size}, "
             f"{args.repeats} repeat(s) (median), "
             f"{data.input_size}px, {data.num_workers} workers, {data.num_threads} DALI threads, "
             f"{args.batches} timed batches")  # fmt: skip
    runs = [profile(data, decoders, args.baseline, args.batches, args.warmup) for _ in range(args.repeats)]
    results = [median_result(list(same)) for same in zip(*runs, strict=True)]
    render(results, title, console)
    if args.plot:
        save_plot(results, title, args.plot)
    failed = [r for r in results if r.error and not r.error.startswith("skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
