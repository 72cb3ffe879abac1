"""Fair throughput profiler: `python -m dali_pipes.profile CONFIG [--decoders pyav,dali] [--baseline B ...]`
(plus `--cores 0,1`, `--threads N`, `--batches`, `--repeats R`, `--json PATH` and dotted overrides).

Measures the training loader of CONFIG (train list, train sampling and augmentation) for every decoder
route asked for (`--decoders pyav,dali` on CPU; `--data.device=gpu` for NVDEC), and with --baseline
standalone torch DataLoaders on the same clips (decode, crop, resize, flip, normalise in torch), all in
one run. Fair by construction:
- same cores: this process pins itself to `--cores` (default: all it may use) before anything starts;
  DALI's worker processes and threads and the DataLoader workers inherit that (each DataLoader worker
  also pins itself), and after every timed window the profiler checks the affinity of the whole
  process tree;
- same thread budget N (`--threads`, default data.num_workers): DALI num_threads = DALI py workers =
  DataLoader workers = torch threads = N;
- CPU-ms per clip = CPU time of this process and all its live descendants from an idle tree to an
  idle tree around the timed batches (every prefetch queue full before and after, so the CPU in between
  is exactly the work of those batches; see settle), / clips, beside clips/s (the same span); each
  process's CPU clock in nanoseconds, not /proc's 10 ms ticks; other jobs on a shared machine do not
  count; a ratio needs at least MIN_RATIO_CPU_S of CPU on both sides; with --repeats, the median and
  the spread [min-max]; and the part of it spent in this process (the consumer: DALI's graph and the
  hand-over for the routes, the collate for the DataLoaders), the rest being worker processes;
- decoded frames per kept frame, counted by an untimed replay of the same clips through the same
  decode code (the DALI video decoder's figure is computed: it decodes from frame 0 to the highest
  requested index, see docs/BENCHMARKS.md);
- ratios against the best baseline of the same run (highest clips/s, lowest CPU-ms per clip).
Baselines: pyav-seek (seek to the keyframe before every wanted frame, decode to it: the plain
seek-per-frame PyAV loader; `pyav` is the same), pyav-seq (decode from frame 0 up to the last wanted
frame), decord and torchcodec (when importable); for frame folders (`data.source: frames`) pil (each
sampled JPEG opened and decoded with Pillow) and simplejpeg (when importable). The first --warmup
batches are not timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable

from engine.config import ConfigError, DataConfig, DefaultsHelpFormatter, exit_if_help, load_config, split_cli

BASELINES = ("pyav-seek", "pyav-seq", "decord", "torchcodec")
FRAME_BASELINES = ("pil", "simplejpeg")  # data.source: frames
ALIASES = {"pyav": "pyav-seek"}


def build_parser() -> argparse.ArgumentParser:
    """The command line, defined before torch and DALI load so that `--help` needs neither."""
    parser = argparse.ArgumentParser(
        prog="python -m dali_pipes.profile", description=__doc__.splitlines()[0],
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("config")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per route")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first (build, worker start)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per route (median reported)")
    parser.add_argument("--baseline", action="append", choices=[*BASELINES, *ALIASES, *FRAME_BASELINES],
                        default=[], help="standalone DataLoader(s) to compare with (repeatable)")  # fmt: skip
    parser.add_argument("--decoders", default="", help="cpu routes: pyav,dali (default: data.cpu_decoder)")
    parser.add_argument("--plot", metavar="PATH", help="also save the table as a bar chart (PNG)")
    parser.add_argument("--cores", default="", help="pin everything to these cores: 0,1 or 0-3 (default all)")
    parser.add_argument("--threads", type=int, default=0,
                        help="thread budget N for every route (default data.num_workers): DALI threads, "
                             "py workers, DataLoader workers and torch threads all = N")  # fmt: skip
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    return parser


if __name__ == "__main__":
    exit_if_help(build_parser)

import av
import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from engine.fileio import atomic_write_text

from .listfile import ListFileError, read_list
from .loader import ClipLoader, build_loader, sampling_options, source_kind
from .sampling import clip_indices
from .source import ClipSource, SpatialOptions, epoch_order
from .trim import decoded_frames as dali_decoded_frames
from .video_io import VideoIndex, decode_frames, index_video

# ---- process tree: CPU time and affinity -------------------------------------------------------


def process_tree() -> set[int]:
    """This process and its live descendants (DALI / DataLoader workers)."""
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
    return tree


def process_cpu_ns(pid: int) -> int | None:
    """CPU time (all threads, ended ones included) of process `pid` in nanoseconds, None once it is gone.

    Linux's per-process CPU clock (what clock_getcpuclockid(pid) returns: ((~pid) << 3) | 2) is exact;
    /proc/<pid>/stat counts in 10 ms ticks, so a short timed window could round a route to 0 ms."""
    try:
        return time.clock_gettime_ns(((~pid) << 3) | 2)
    except OSError:  # ended (EINVAL), or a pid this kernel will not let us read
        return None


def tree_cpu_seconds(tree: set[int] | None = None) -> float:
    """CPU seconds (user + system, all threads) used so far by the process tree.

    Unlike a machine-wide figure this is not inflated by other jobs on a shared machine.
    """
    total = 0
    for pid in process_tree() if tree is None else tree:
        total += process_cpu_ns(pid) or 0
    return total / 1e9


def pin(cores: set[int]) -> None:
    """Pin every thread of this process and of the children it already has (sched_setaffinity(0) alone
    moves only the calling thread; libraries imported earlier may have started threads, and helper
    processes such as multiprocessing's resource tracker may be running). Later ones inherit it."""
    for pid in process_tree():
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:  # a process that just ended
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(int(tid), cores)
            except (ProcessLookupError, PermissionError):  # a thread that just ended
                continue


def tree_affinity() -> set[int]:
    """Union of the CPU affinities of every thread in the process tree (what it can run on)."""
    cores: set[int] = set()
    for pid in process_tree():
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                cores |= os.sched_getaffinity(int(tid))
        except OSError:
            continue
    return cores


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
    kind: str  # route | baseline
    clips: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # process tree, timed window
    main_cpu_seconds: float = 0.0  # of which this (the consuming) process: DALI's graph, the hand-over
    decoded_per_kept: float | None = None
    decoded_note: str = ""  # "counted" | "computed" | why missing
    gpu: str = "-"
    error: str = ""
    started_at: float = 0.0  # wall clock (Unix s) at the start of the timed window: lines up GPU samplers
    settled: bool = True  # the window began and ended with an idle tree (settle)
    cpu_ms_runs: list[float] = dataclasses.field(default_factory=list)  # each repeat's CPU-ms per clip
    clips_per_s_runs: list[float] = dataclasses.field(default_factory=list)

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_per_clip(self) -> float:
        return 1000.0 * self.cpu_seconds / self.clips if self.clips else 0.0

    @property
    def main_cpu_ms_per_clip(self) -> float:
        return 1000.0 * self.main_cpu_seconds / self.clips if self.clips else 0.0

    @property
    def cores_used(self) -> float:
        return self.cpu_seconds / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "clips_per_s": self.clips_per_s,
                "cpu_ms_per_clip": self.cpu_ms_per_clip, "main_cpu_ms_per_clip": self.main_cpu_ms_per_clip,
                "cores_used": self.cores_used}  # fmt: skip


SETTLE_POLL_S = 0.02  # how often settle() reads the tree's CPU clocks
SETTLE_IDLE_S = 0.001  # CPU per poll below which the tree counts as idle (5 % of one core)
SETTLE_TIMEOUT_S = 10.0


def settle(tree: set[int], timeout: float = SETTLE_TIMEOUT_S) -> tuple[float, float, bool]:
    """Wait until the tree is idle: every prefetch queue full, the producers blocked.

    Returns (tree CPU seconds, perf_counter time at which the idle poll began, settled). A loader's
    producers work ahead of its consumer, so CPU read at the first and last batch would leave out the
    batches prefetched before the window and count work done for batches after it; between two idle
    points the queues are in the same (full) state, so the CPU in between is exactly the work of the
    batches taken. `settled` is False when the tree never went idle within `timeout` (then the figures
    are those of a plain window)."""
    cpu, at = tree_cpu_seconds(tree), time.perf_counter()
    deadline = at + timeout
    while at < deadline:
        time.sleep(SETTLE_POLL_S)
        now_cpu, now = tree_cpu_seconds(tree), time.perf_counter()
        if now_cpu - cpu < SETTLE_IDLE_S:
            return now_cpu, at, True
        cpu, at = now_cpu, now
    return cpu, at, False


def timed(name: str, kind: str, batches: Iterable, warmup: int, count: int, clips_of: Callable,
          cores: set[int]) -> Result:  # fmt: skip
    """`count` batches after `warmup` untimed ones, from an idle tree to an idle tree (see settle): CPU
    of the process tree and wall time from the first request to the end of the refill."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    tree = process_tree()  # the workers are up after the warm-up
    cpu0, _, settled0 = settle(tree)
    main0 = process_cpu_ns(os.getpid()) or 0
    started_at = time.time()
    start, clips = time.perf_counter(), 0
    for _ in range(count):
        clips += clips_of(next(it))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    cpu, end, settled = settle(tree)
    main = ((process_cpu_ns(os.getpid()) or 0) - main0) / 1e9
    if process_tree() - tree:
        raise RuntimeError(f"{name}: processes started inside the timed window (their CPU would be lost)")
    outside = tree_affinity() - cores
    if outside:
        raise RuntimeError(f"{name}: a process of the tree may run on cores {sorted(outside)} (not pinned)")
    return Result(name, kind, clips, end - start, cpu - cpu0, main, gpu=gpu_stats(), started_at=started_at,
                  settled=settled0 and settled)  # fmt: skip


def endless(loader):
    while True:
        yield from loader


# ---- the standalone baselines -------------------------------------------------------------------

_INDEX: dict[str, VideoIndex] = {}  # per process, as the route's per-worker cache
_PACKETS: dict[str, VideoIndex] = {}


def packet_index(path: str) -> VideoIndex:
    """The full packet index (what trimming needs), demuxed once per file in this process."""
    from .packet_index import build_video_index

    if path not in _PACKETS:
        _PACKETS[path] = build_video_index(path)
    return _PACKETS[path]


def cached_index(path: str) -> VideoIndex:
    if path not in _INDEX:
        _INDEX[path] = index_video(path)
    return _INDEX[path]


def pyav_seek_per_frame(path: str, idx: np.ndarray, stats: dict | None = None) -> np.ndarray:
    """The plain seek-per-frame PyAV loader: for every wanted frame seek to the keyframe before it and
    decode up to it (PyAV's default threads, frame.to_ndarray)."""
    index = cached_index(path)
    frames, decoded = {}, 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        for i in sorted({int(i) for i in idx}):
            container.seek(index.pts[i], stream=stream, backward=True)
            for frame in container.decode(stream):
                decoded += 1
                if frame.pts is not None and frame.pts >= index.pts[i]:
                    frames[i] = frame.to_ndarray(format="rgb24")
                    break
    if stats is not None:
        stats["decoded"] = stats.get("decoded", 0) + decoded
        stats["kept"] = stats.get("kept", 0) + len(idx)
    return np.stack([frames[int(i)] for i in idx])


def pyav_sequential(path: str, idx: np.ndarray, stats: dict | None = None) -> np.ndarray:
    """The plain sequential PyAV loader: decode from frame 0 up to the last wanted frame."""
    wanted, last = {int(i) for i in idx}, int(max(idx))
    frames, decoded = {}, 0
    with av.open(path) as container:
        for k, frame in enumerate(container.decode(video=0)):
            decoded += 1
            if k in wanted:
                frames[k] = frame.to_ndarray(format="rgb24")
            if k >= last:
                break
    if stats is not None:
        stats["decoded"] = stats.get("decoded", 0) + decoded
        stats["kept"] = stats.get("kept", 0) + len(idx)
    return np.stack([frames[int(i)] for i in idx])


def baseline_decoder(name: str) -> Callable[..., np.ndarray]:
    """Frame-accurate decode -> uint8 (n, H, W, 3) with the named library."""
    name = ALIASES.get(name, name)
    if name == "pyav-seek":
        return pyav_seek_per_frame
    if name == "pyav-seq":
        return pyav_sequential
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


def frame_folder_decoder(name: str, template: str, start: int) -> Callable[[str, np.ndarray], np.ndarray]:
    """A plain frame-folder reader -> uint8 (n, H, W, 3) RGB: each sampled JPEG opened and decoded once."""
    if name == "pil":
        from PIL import Image

        def decode_one(path: str) -> np.ndarray:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
    elif name == "simplejpeg":
        import simplejpeg

        def decode_one(path: str) -> np.ndarray:
            with open(path, "rb") as f:
                return simplejpeg.decode_jpeg(f.read(), colorspace="RGB")
    else:
        raise ValueError(f"unknown frame-folder baseline {name!r}")

    def decode(folder: str, idx: np.ndarray) -> np.ndarray:
        wanted = idx.tolist()
        frames = {i: decode_one(os.path.join(folder, template.format(start + i))) for i in set(wanted)}
        return np.stack([frames[i] for i in wanted])

    return decode


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
        if data.source == "frames":
            self.decode = frame_folder_decoder(decoder, data.frame_template, data.frame_start)
        else:
            self.decode = baseline_decoder(decoder)
        if ALIASES.get(decoder, decoder) == "pyav-seek":  # as the route's packet index: ready before the
            for entry in self.entries:  # workers fork, so no timed window pays for demuxing a file
                cached_index(entry.path)
        self.mean = torch.tensor(data.mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(data.std).view(1, 3, 1, 1) * 255

    def __len__(self) -> int:
        return len(self.order)

    def indices(self, k: int) -> tuple[int, np.ndarray]:
        sid = int(self.order[k])
        n = self.entries[sid].num_frames
        return sid, clip_indices(n, "train", self.opts, self.data.seed, self.epoch, sid).ravel()

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        sid, idx = self.indices(k)
        entry = self.entries[sid]
        frames = torch.from_numpy(self.decode(entry.path, idx))
        h, w = frames.shape[1:3]
        rois, mirror, label = self.spatial.spatial_params(w, h, entry.label, self.epoch, sid)
        y0, x0, y1, x1 = rois[0]
        crop = frames[:, round(y0 * h) : round(y1 * h), round(x0 * w) : round(x1 * w)].permute(0, 3, 1, 2)
        size = self.data.input_size
        x = F.interpolate(crop.float(), size=(size, size), mode="bilinear", antialias=True)
        if int(mirror):
            x = x.flip(-1)
        return (x - self.mean) / self.std, label


class _PinWorker:
    """DataLoader worker_init_fn: the worker pins itself to the profiler's cores, one torch thread."""

    def __init__(self, cores: set[int]) -> None:
        self.cores = cores

    def __call__(self, worker_id: int) -> None:
        os.sched_setaffinity(0, self.cores)
        torch.set_num_threads(1)


def baseline_loader(
    data: DataConfig, decoder: str, cores: set[int] | None = None
) -> torch.utils.data.DataLoader:
    cores = cores or os.sched_getaffinity(0)
    return torch.utils.data.DataLoader(
        BaselineDataset(data, decoder), batch_size=data.batch_size, num_workers=data.num_workers,
        persistent_workers=data.num_workers > 0, prefetch_factor=data.prefetch if data.num_workers else None,
        worker_init_fn=_PinWorker(cores),
    )  # fmt: skip


# ---- decoded frames per kept frame (untimed replay of the same clips) ---------------------------


def decoded_per_kept(data: DataConfig, decoder: str, clips: int) -> tuple[float | None, str]:
    """(decoded / kept frames, how it was obtained) over the first `clips` clips of epoch 0."""
    dataset = BaselineDataset(data, "pyav-seek")
    decoded = kept = 0
    stats: dict[str, int] = {}
    for k in range(min(clips, len(dataset))):
        sid, idx = dataset.indices(k)
        path = dataset.entries[sid].path
        if decoder == "route:pyav":  # the route's own code, on the packet index the loader uses
            decode_frames(path, idx, packet_index(path), stats=stats)
        elif decoder == "route:bytes":  # DALI's video decoder: frame 0 up to the highest index it is given
            decoded += dali_decoded_frames(packet_index(path), idx, trimmed=data.trim == "on")
            kept += len(idx)
        elif decoder in ("pyav-seek", "pyav-seq"):
            baseline_decoder(decoder)(path, idx, stats)
        else:
            return None, f"{decoder} does not report it"
    if decoder == "route:bytes":
        return decoded / max(kept, 1), "computed"
    return stats.get("decoded", 0) / max(stats.get("kept", 1), 1), "counted"


# ---- main ---------------------------------------------------------------------------------------


def route_name(data: DataConfig, decoder: str) -> str:
    if data.source == "frames":
        return f"DALI {data.device} (JPEG folders)"
    if data.device == "gpu":
        return "DALI gpu (NVDEC)"
    return f"DALI cpu ({decoder} decode)"


def profile(data: DataConfig, decoders: list[str], baselines: list[str], batches: int, warmup: int,
            cores: set[int], count_decoded: bool = True) -> list[Result]:  # fmt: skip
    """One measurement of every route and baseline, one after the other; `count_decoded`: also replay
    the clips to count decoded frames per kept frame (the same in every repeat: the first does it)."""
    results = []
    clips = batches * data.batch_size
    for decoder in decoders:
        cfg = dataclasses.replace(data, cpu_decoder=decoder) if data.device == "cpu" else data
        name = route_name(data, decoder)
        try:
            loader: ClipLoader = build_loader(cfg, "train", device_id=0 if data.device == "gpu" else None)
            try:
                r = timed(name, "route", endless(loader), warmup, batches, lambda b: len(b["labels"]), cores)
            finally:
                loader.close()
            if data.source != "frames" and count_decoded:
                r.decoded_per_kept, r.decoded_note = decoded_per_kept(cfg, f"route:{source_kind(cfg)}", clips)
            results.append(r)
        except Exception as e:
            results.append(Result(name, "route", error=str(e).splitlines()[0][:240]))
        if data.source == "frames":
            break
    for name in baselines:
        label = f"DataLoader + {name} ({data.num_workers} workers)"
        module = {"pil": "PIL"}.get(name, name.split("-")[0])
        if module != "pyav" and importlib.util.find_spec(module) is None:
            results.append(Result(label, "baseline", error=f"skipped: {name} is not importable"))
            continue
        try:
            loader = baseline_loader(data, name, cores)
            r = timed(label, "baseline", endless(loader), warmup, batches, lambda b: len(b[1]), cores)
            del loader
            if data.source != "frames" and count_decoded:
                r.decoded_per_kept, r.decoded_note = decoded_per_kept(data, name, clips)
            results.append(r)
        except Exception as e:
            results.append(Result(label, "baseline", error=str(e).splitlines()[0][:240]))
    return results


def median_result(runs: list[Result]) -> Result:
    """Per-metric medians over the repeats (routes alternate within a repeat, so load drifts hit all)."""
    if any(r.error for r in runs):
        return next(r for r in runs if r.error)
    clips = runs[0].clips
    return dataclasses.replace(
        runs[0],
        seconds=clips / statistics.median(r.clips_per_s for r in runs),
        cpu_seconds=statistics.median(r.cpu_seconds for r in runs),
        main_cpu_seconds=statistics.median(r.main_cpu_seconds for r in runs),
        settled=all(r.settled for r in runs),
        cpu_ms_runs=[round(r.cpu_ms_per_clip, 2) for r in runs],
        clips_per_s_runs=[round(r.clips_per_s, 2) for r in runs],
    )


def best_baselines(results: list[Result]) -> tuple[Result | None, Result | None]:
    """(highest clips/s, lowest CPU-ms per clip) among the baselines that ran."""
    ok = [r for r in results if r.kind == "baseline" and not r.error and r.clips]
    if not ok:
        return None, None
    return max(ok, key=lambda r: r.clips_per_s), min(ok, key=lambda r: r.cpu_ms_per_clip)


MIN_RATIO_CPU_S = 0.05  # below this, a CPU-ms ratio is mostly start-up noise
TOO_LITTLE_CPU = "too little CPU time measured for a ratio; use more --batches"


def ratio(value: float, base: float, enough: bool = True) -> str:
    """`value / base` as '1.23x', or '-' when there is nothing to divide by or too little was measured."""
    return f"{value / base:.2f}x" if enough and base > 0 else "-"


def enough_cpu(*results: Result) -> bool:
    return all(r.cpu_seconds >= MIN_RATIO_CPU_S for r in results)


def render(results: list[Result], title: str, console: Console) -> None:
    table = Table(title=title)
    columns = ("route", "clips/s", "vs best clips/s", "CPU-ms/clip", "vs best CPU-ms", "main CPU-ms",
               "decoded/kept frame", "cores used", "GPU mem / NVDEC")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col == "route" else "right")
    fast, cheap = best_baselines(results)
    starved = unsettled = False
    for r in results:
        if r.error:
            table.add_row(r.name, "-", "-", "-", "-", "-", "-", "-", f"[red]{r.error}[/red]")
            continue
        speed = ratio(r.clips_per_s, fast.clips_per_s) if fast else "-"
        cost = ratio(r.cpu_ms_per_clip, cheap.cpu_ms_per_clip, enough_cpu(r, cheap)) if cheap else "-"
        starved |= bool(cheap) and not enough_cpu(r, cheap)
        dec = "-" if r.decoded_per_kept is None else f"{r.decoded_per_kept:.2f}"
        if r.decoded_note == "computed":
            dec += " (c)"
        cpu_ms = f"{r.cpu_ms_per_clip:.1f}"
        if len(r.cpu_ms_runs) > 1:  # the spread of the repeats beside their median
            cpu_ms += f" [{min(r.cpu_ms_runs):.1f}-{max(r.cpu_ms_runs):.1f}]"
        unsettled |= not r.settled
        table.add_row(r.name + ("" if r.settled else " *"), f"{r.clips_per_s:.1f}", speed, cpu_ms, cost,
                      f"{r.main_cpu_ms_per_clip:.1f}", dec, f"{r.cores_used:.2f}", r.gpu)  # fmt: skip
    console.print(table)
    if unsettled:
        console.print(f"*: the loader's processes never went idle within {SETTLE_TIMEOUT_S:.0f} s around the "
                      "timed batches, so its window may leave out prefetched work (see settle)")  # fmt: skip
    if fast:
        console.print(f"best baseline: {fast.name} by clips/s, {cheap.name} by CPU-ms per clip; (c) = "
                      "computed (DALI decodes from frame 0 to the highest index it is given)")  # fmt: skip
    if starved:
        need = f"each side needs {MIN_RATIO_CPU_S * 1000:.0f} ms"
        console.print(f"vs best CPU-ms '-': {TOO_LITTLE_CPU} ({need})")


def parse_cores(text: str) -> set[int]:
    """'0,1' or '0-3' or '' (all this process may use)."""
    if not text:
        return set(os.sched_getaffinity(0))
    cores: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cores.update(range(int(lo), int(hi or lo) + 1))
    return cores


def save_plot(results: list[Result], title: str, path: str) -> None:
    """The result table as a bar chart: CPU-ms per clip per route, cheapest on top, labelled with clips/s."""
    from engine.fileio import atomic_write
    from engine.plot import plot_throughput

    names = [r.name for r in results]
    rates = [0.0 if r.error else r.clips_per_s for r in results]
    cpu_ms = [0.0 if r.error else r.cpu_ms_per_clip for r in results]
    errors = [r.error for r in results]
    atomic_write(path, lambda f: plot_throughput(names, rates, cpu_ms, title, f, errors))
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = split_cli(argv)
    parser = build_parser()
    args = parser.parse_args(rest)
    try:
        cfg = load_config(args.config, overrides)
        cores = parse_cores(args.cores)
        pin(cores)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"error: --cores {args.cores!r}: {e}", file=sys.stderr)
        return 2
    budget = args.threads or cfg.data.num_workers
    if budget < 1:
        print("error: --threads / data.num_workers must be >= 1 for a fair comparison", file=sys.stderr)
        return 2
    data = dataclasses.replace(cfg.data, num_workers=budget, num_threads=budget)
    torch.set_num_threads(budget)
    decoders = [d for d in args.decoders.split(",") if d] or [data.cpu_decoder]
    for d in decoders:
        if d not in ("pyav", "dali"):
            print(f"error: --decoders: {d!r} is not pyav or dali", file=sys.stderr)
            return 2
    baselines = list(dict.fromkeys(ALIASES.get(b, b) for b in args.baseline))
    wrong = [b for b in baselines if (b in FRAME_BASELINES) != (data.source == "frames")]
    if wrong:
        print(f"error: --baseline {wrong[0]}: not for data.source: {data.source} (frame folders: "
              f"{', '.join(FRAME_BASELINES)}; videos: {', '.join(BASELINES)})", file=sys.stderr)  # fmt: skip
        return 2
    console = Console(width=180)
    try:
        n = len(read_list(data.train_list, data.root))
    except ListFileError as e:
        print(f"error: data.train_list: {e}", file=sys.stderr)
        return 2
    fpc = sampling_options(data, None).frames_per_clip
    title = (f"{data.train_list}: {n} videos, {data.sampling} T={fpc}, batch {data.batch_size}, "
             f"{data.input_size}px, cores {','.join(map(str, sorted(cores)))}, thread budget {budget} "
             f"(DALI threads = workers = torch threads), {args.batches} timed batches, "
             f"{args.repeats} repeat(s) (median)")  # fmt: skip
    runs = [profile(data, decoders, baselines, args.batches, args.warmup, cores, count_decoded=k == 0)
            for k in range(args.repeats)]  # fmt: skip
    results = [median_result(list(same)) for same in zip(*runs, strict=True)]
    render(results, title, console)
    if args.plot:
        save_plot(results, title, args.plot)
    if args.json:
        fast, cheap = best_baselines(results)
        doc = {"title": title, "command": ["python", "-m", "dali_pipes.profile", *argv],
               "cores": sorted(cores), "thread_budget": budget,
               "best_baseline_clips_per_s": fast.name if fast else None,
               "best_baseline_cpu_ms": cheap.name if cheap else None,
               "results": [r.as_dict() for r in results]}  # fmt: skip
        atomic_write_text(args.json, json.dumps(doc, indent=2) + "\n")
    failed = [r for r in results if r.error and not r.error.startswith("skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
