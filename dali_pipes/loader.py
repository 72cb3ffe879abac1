"""build_loader: list file -> DALI pipeline -> torch batches, with epoch/position state.

The loader owns one DALI pipeline and keeps it across epochs (DALI's epoch counter advances with
ours). It rebuilds the pipeline only when the position jumps (set_epoch to another epoch,
load_state_dict, or after an abandoned or failed epoch), so a restarted job continues with exactly the
batches an uninterrupted one would have produced: every choice derives from (seed, epoch, sample id).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import re
from collections.abc import Callable, Iterator

import torch
from nvidia.dali import types
from nvidia.dali.backend import TensorListCPU
from nvidia.dali.plugin.pytorch import feed_ndarray

from engine.config import DataConfig, EvalConfig

from .graph import clip_graph
from .listfile import read_flip_pairs, read_list
from .packet_index import prepare_index
from .sampling import SamplingOptions, clip_indices
from .source import LEFT_OUT, ClipLoadError, ClipSource, SpatialOptions
from .video_io import decode_frames

log = logging.getLogger(__name__)
MODES = ("train", "val", "test")
START_METHODS = ("fork", "spawn")
_TORCH = {types.FLOAT: torch.float32, types.FLOAT16: torch.float16, types.INT64: torch.int64,
          types.INT32: torch.int32, types.UINT8: torch.uint8}  # fmt: skip


def sampling_options(data: DataConfig, views: EvalConfig | None) -> SamplingOptions:
    """The sampler's options; eval.temporal_mode `auto` is resolved from data.sampling."""
    views = (views or EvalConfig()).resolved(data.sampling)
    return SamplingOptions(
        mode=data.sampling,
        num_segments=data.num_segments,
        snippet_len=data.snippet_len,
        dense_window=data.dense_window,
        dense_span=data.dense_span,
        clip_len=data.clip_len,
        frame_interval=data.frame_interval,
        val_sampling=data.val_sampling,
        test_mode=views.temporal_mode,
        test_clips=views.temporal_clips,
    )


def worker_start_method(data: DataConfig, start_method: str | None = None) -> str:
    """How DALI starts the source's worker processes: `start_method` when given, else spawn on the GPU
    route (its process has CUDA initialised, and a forked child of it must not touch CUDA) and fork on
    the CPU route (fastest). Tests pass spawn on the CPU route so the GPU route's start method runs in CI."""
    if start_method is None:
        return "spawn" if data.device == "gpu" else "fork"
    if start_method not in START_METHODS:
        raise ValueError(f"start_method must be one of {START_METHODS}, got {start_method!r}")
    if start_method == "fork" and data.device == "gpu":
        raise ValueError("start_method fork: the GPU route's workers must be spawned (CUDA is initialised)")
    return start_method


def source_kind(data: DataConfig) -> str:
    """frames (JPEG folders) | bytes (DALI video decoder: NVDEC on GPU, or cpu_decoder: dali) | pyav."""
    if data.source == "frames":
        return "frames"
    if data.device == "gpu" or data.cpu_decoder == "dali":
        return "bytes"
    return "pyav"


def _job_barrier(world_size: int) -> Callable[[], None] | None:
    """The process group's barrier when this is one rank of several (the packet index is built once)."""
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.barrier
    return None


class _MarkedBad(Exception):
    """A sample DALI failed on was marked bad (skip_bad): build the pipeline again and redo the batch."""


class ClipLoader:
    """Iterable of {"clips", "labels", "ids"} batches for one rank (see CONTRACTS.md)."""

    def __init__(
        self,
        data: DataConfig,
        mode: str,
        rank: int = 0,
        world_size: int = 1,
        views: EvalConfig | None = None,
        device_id: int | None = None,
        rotate: bool = False,
        start_method: str | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if data.device == "gpu" and device_id is None:
            raise ValueError("data.device: gpu needs a device_id (data.device: cpu runs without a GPU)")
        key = "data.train_list" if mode == "train" else "data.val_list"
        list_path = data.train_list if mode == "train" else data.val_list
        if not list_path:
            raise ValueError(f"{key}: not set (needed for mode '{mode}')")
        self.data, self.mode, self.views = data, mode, views or EvalConfig()
        self.start_method = worker_start_method(data, start_method)
        self.device = torch.device(f"cuda:{device_id}") if data.device == "gpu" else torch.device("cpu")
        self.device_id = device_id if data.device == "gpu" else None
        self.list_path = list_path
        entries = read_list(list_path, data.root)
        pairs = read_flip_pairs(data.flip_pairs) if data.flip == "pairs" and mode == "train" else {}
        test = mode == "test"
        self.sampling = sampling_options(data, self.views)
        try:  # option errors (e.g. eval.temporal_mode vs temporal_clips) here, not in a worker
            clip_indices(1000, mode, self.sampling)
        except ValueError as e:
            raise ValueError(f"{mode} sampling: {e}") from None
        spatial = SpatialOptions.from_config(data, pairs, self.views if test else None)
        self.batch = self.views.batch_size if test else data.batch_size
        kind = source_kind(data)
        index = None
        if kind != "frames":  # one packet index per list, complete before the workers start
            index, built = prepare_index(list_path, [e.path for e in entries], rank, world_size,
                                         _job_barrier(world_size), jobs=max(1, data.num_workers))  # fmt: skip
            if built:
                log.info("%s: packet index built for %d videos (prep.lists/prep.validate write it offline)",
                         index.path, built)  # fmt: skip
        self.source = ClipSource(
            entries=entries, kind=kind, split=mode, sampling=self.sampling, spatial=spatial,
            seed=data.seed, rank=rank, world=world_size, batch=self.batch, uneven=data.uneven,
            skip_bad=data.skip_bad, frame_template=data.frame_template, frame_start=data.frame_start,
            device=data.device, trim=data.trim == "on", index=index, rotate=rotate,
        )  # fmt: skip
        self.num_videos = len(entries)
        self.num_crops = spatial.spatial_crops
        self.num_clips = self.sampling.clips(mode)
        self.out_size = spatial.out_size
        self._len = len(self.source.order(0)) // self.batch
        if self._len == 0 and mode == "train":  # eval: a rank beyond the list's length just yields nothing
            raise ValueError(
                f"{list_path}: {self.num_videos} videos give no full batch of {self.batch} for rank {rank}/"
                f"{world_size} (lower data.batch_size or use data.uneven: pad)"
            )
        self.epoch, self.position = 0, 0
        # data.skip_bad: bad train samples replaced by another sample, bad val/test samples left out
        self.replaced, self.left_out = 0, 0
        self._pipe = None
        self._pipe_at: tuple[int, int] | None = None  # (epoch, batch) the pipeline delivers next

    # ---- state ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches this rank yields in a whole epoch (the same in every epoch)."""
        return self._len

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; the same epoch keeps the saved position (resume)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    @property
    def skipped(self) -> int:
        """Bad samples so far (data.skip_bad): `replaced` in train, `left_out` in val/test."""
        return self.replaced + self.left_out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        skipped = int(state.get("skipped", 0))
        self.replaced, self.left_out = (skipped, 0) if self.mode == "train" else (0, skipped)

    # ---- iteration ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        if self.position >= self._len > 0:  # a finished epoch that was saved before the epoch moved on
            self.epoch, self.position = self.epoch + 1, 0
        if self._len == 0:
            self.epoch += 1
            return
        while self.position < self._len:
            outputs = self._next_outputs()
            self.position += 1
            self._pipe_at = (self.epoch, self.position)
            yield self._to_batch(outputs)
        pipe = self._pipeline()
        try:
            self._run(pipe)
            raise RuntimeError(f"{self.list_path}: the pipeline produced more batches than planned")
        except StopIteration:
            pipe.reset()
        self.epoch, self.position = self.epoch + 1, 0
        self._pipe_at = (self.epoch, 0)

    def close(self) -> None:
        """Stop the DALI pipeline and its worker processes."""
        if self._pipe is not None:
            pool = getattr(self._pipe, "_py_pool", None)
            self._pipe = None
            if pool is not None:
                pool.close()
            gc.collect()
        self._pipe_at = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _pipeline(self):
        if self._pipe is not None and self._pipe_at == (self.epoch, self.position):
            return self._pipe
        self.close()
        source = dataclasses.replace(self.source, base_epoch=self.epoch, start_batch=self.position)
        workers = self.data.num_workers
        pipe = clip_graph(
            source=source,
            device=self.data.device,
            num_crops=self.num_crops,
            out_size=self.out_size,
            mean=self.data.mean,
            std=self.data.std,
            dtype=self.data.dtype,
            parallel=workers > 0,
            prefetch=self.data.prefetch,
            batch_size=self.batch * source.group,
            num_threads=self.data.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=self.data.prefetch,
            py_num_workers=max(workers, 1),
            py_start_method=self.start_method,
            seed=self.data.seed,
            exec_dynamic=True,
        )
        pipe.build()
        self._pipe, self._pipe_at = pipe, (self.epoch, self.position)
        return pipe

    def _next_outputs(self) -> tuple:
        """The next batch. With skip_bad, a sample that only DALI's decoder fails on (found by
        `_find_bad_sample`) is marked bad in the source and the batch is rebuilt from the same position,
        so it is replaced (train) or left out (val/test) like any other bad sample."""
        for _ in range(len(self.source.entries) + 1):  # each retry marks another list line bad
            try:
                return self._run(self._pipeline())
            except _MarkedBad:
                continue
        raise RuntimeError(f"{self.list_path}: every sample of batch {self.position} failed in DALI")

    def _run(self, pipe) -> tuple:
        try:
            return pipe.run()
        except StopIteration:
            raise
        except ClipLoadError:  # raised as is when the source runs in this process (num_workers: 0)
            self.close()
            raise
        except Exception as e:  # DALI wraps worker errors; surface ours, name the list otherwise
            self.close()
            text = str(e)
            found = re.search(r"ClipLoadError: (.*)", text)
            if found:
                raise ClipLoadError(found.group(1).strip()) from None
            culprit = self._find_bad_sample()
            if culprit:
                sid, reason = culprit
                if self.data.skip_bad:
                    self.source.known_bad[sid] = reason
                    raise _MarkedBad from None
                entry = self.source.entries[sid]
                raise ClipLoadError(f"{entry.where}: bad sample {entry.path}: {reason}") from None
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            detail = " | ".join(dict.fromkeys(lines[:1] + lines[-3:]))  # one line for the CLIs
            raise ClipLoadError(
                f"{self.list_path}: DALI failed in epoch {self.epoch}, batch {self.position} "
                f"(a corrupt file? run `python -m prep.validate {self.list_path}`): {detail}"
            ) from None

    def _find_bad_sample(self) -> tuple[int, str] | None:
        """After DALI failed a batch: decode its samples one by one (PyAV / PIL) to name the bad one.

        Returns (list line, why) of the first sample DALI was given that does not decode here.
        """
        from PIL import Image

        src = self.source
        order = src.order(self.epoch)
        for slot in order[self.position * self.batch : (self.position + 1) * self.batch]:
            slot = int(slot) if slot >= 0 else int(order[0])
            # the line DALI was given for this slot: itself, or (skip_bad) its replacement
            fed = [c for c in src.candidates(slot, self.epoch) if c not in src.known_bad]
            sid = next((c for c in fed if src.readable(c, self.epoch)), None)
            if sid is None:
                continue
            entry = src.entries[sid]
            frames = clip_indices(entry.num_frames, self.mode, self.sampling, src.seed, self.epoch, sid)
            frames = frames.ravel()
            try:
                if src.kind == "frames":
                    for i in frames:
                        name = os.path.join(entry.path, src.frame_template.format(src.frame_start + int(i)))
                        with Image.open(name) as image:
                            image.load()
                else:
                    decode_frames(entry.path, frames)
            except Exception as e:
                return sid, f"{e} (found after DALI failed its batch)"
        return None

    def _to_torch(self, tensor_list, device: torch.device) -> torch.Tensor:
        dense = tensor_list.as_tensor()
        if device.type == "cpu" and isinstance(tensor_list, TensorListCPU):
            # No copy: the pipeline runs with exec_dynamic, whose outputs live (from DALI's memory pool)
            # while anything references them. A copy into a new torch tensor cost the CPU route 2 ms per
            # 224 px clip, half of it page faults on the fresh memory (docs/BENCHMARKS.md).
            return torch.from_dlpack(dense)
        out = torch.empty(dense.shape(), dtype=_TORCH[dense.dtype], device=device)
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        feed_ndarray(dense, out, cuda_stream=stream)
        return out

    def _to_batch(self, outputs: tuple) -> dict:
        clips = self._to_torch(outputs[0], self.device)
        labels, ids, replaced = (self._to_torch(o, torch.device("cpu")) for o in outputs[1:])
        group = self.source.group
        if group > 1:  # frame folders: one DALI sample per frame
            labels, ids, replaced = labels[::group], ids[::group], replaced[::group]
        if self.mode == "train":
            self.replaced += int(replaced.sum())
        else:
            self.left_out += int((ids == LEFT_OUT).sum())
        n, crops, clip_n = len(ids), self.num_crops, self.num_clips
        c, h, w = clips.shape[-3:]
        if group > 1:
            x = clips.view(n, clip_n, -1, crops, c, h, w).permute(0, 1, 3, 2, 4, 5, 6)
        else:
            x = clips.view(n, crops, clip_n, -1, c, h, w).permute(0, 2, 1, 3, 4, 5, 6)
        x = x.reshape(n, clip_n * crops, -1, c, h, w)
        if self.data.layout == "NCTHW":
            x = x.permute(0, 1, 3, 2, 4, 5)
        if self.mode == "train":
            x = x[:, 0]
        else:
            keep = ids >= 0  # drop padding slots and (skip_bad) bad videos: each video once
            if not bool(keep.all()):
                index = torch.nonzero(keep).squeeze(1)
                x, labels, ids = x.index_select(0, index.to(x.device)), labels[index], ids[index]
        x = x.contiguous()
        if self.data.dtype == "bfloat16":
            x = x.to(torch.bfloat16)
        if self.device.type == "cuda":
            labels, ids = labels.to(self.device, non_blocking=True), ids.to(self.device, non_blocking=True)
        return {"clips": x, "labels": labels, "ids": ids}


def build_loader(
    data_cfg: DataConfig,
    mode: str,
    rank: int = 0,
    world_size: int = 1,
    views: EvalConfig | None = None,
    device_id: int | None = None,
    rotate: bool = False,
    start_method: str | None = None,
) -> ClipLoader:
    """The contract's entry point: a ClipLoader for `mode` (train | val | test) on this rank. `rotate`
    (predict only): the PyAV route turns rotated videos upright instead of refusing them.

    `start_method` (fork | spawn; default: spawn on the GPU route, fork on the CPU route) is an internal
    switch for tests: CI has no GPU, so it runs the CPU route with spawn to cover the GPU route's start."""
    return ClipLoader(data_cfg, mode, rank, world_size, views, device_id, rotate=rotate,
                      start_method=start_method)  # fmt: skip


__all__ = ["ClipLoader", "ClipLoadError", "build_loader"]
