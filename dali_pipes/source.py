"""Per-rank sample stream for DALI's parallel external source.

`epoch_order` decides which list lines a rank reads in an epoch (pure: seed, epoch, rank, world).
`ClipSource` is the per-sample callback DALI runs in its worker processes: it maps DALI's
(epoch_idx, idx_in_epoch) to a list line, samples frame indices and crop/flip parameters from
(seed, epoch, sample id), and returns either decoded frames (PyAV route; in training already cropped
and resized, see `ClipSource.resizes`), the encoded file plus indices (DALI decoders) or one JPEG
(frame folders). Bad files are detected here, per sample, so
the error names the file and the list line instead of failing a whole DALI batch anonymously.
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.lifetime import die_with_parent  # (the DALI workers': see ClipSource.__call__)

from .augment import crop_resize, eval_crops, flip_and_label, multiscale_crop, random_resized_crop, to_roi
from .listfile import Entry
from .sampling import REPLACE, SPATIAL, SamplingOptions, clip_indices, sample_rng

if TYPE_CHECKING:
    from engine.config import DataConfig, EvalConfig

from .packet_index import PacketIndex, not_a_file
from .trim import trim
from .video_io import VideoIndex, VideoReadError, decode_frames, rotation_refused

log = logging.getLogger(__name__)
DALI_CPU_CODECS = ("vp8", "vp9", "libvpx", "libvpx-vp9", "mjpeg")
PAD = -1  # order entry of a padding slot in evaluation (dropped by the loader)
LEFT_OUT = -2  # id of a bad val/test sample with skip_bad (dropped and counted by the loader)


_WARNED: set[tuple[str, str]] = set()  # (list line, split) already reported by this process
_WORKER_PID = 0  # the DALI worker process set up by _enter_worker


def _enter_worker(owner_pid: int) -> None:
    """Once per DALI worker process: die with the trainer, and one torch thread (the thread budget is
    the number of workers; crop_resize would otherwise start a pool the size of the machine)."""
    global _WORKER_PID
    if _WORKER_PID == os.getpid():
        return
    _WORKER_PID = os.getpid()
    die_with_parent(owner_pid, ignore_sigint=True)
    torch.set_num_threads(1)


class ClipLoadError(RuntimeError):
    """A listed sample that cannot be read; the message names the list line and the file."""


def epoch_order(
    num_videos: int, split: str, seed: int, epoch: int, rank: int, world: int, batch: int, uneven: str
) -> np.ndarray:
    """List lines this rank reads this epoch, a whole number of batches long.

    train: one permutation from (seed, epoch) shared by all ranks; rank r takes every world-th
    entry. `pad` extends the permutation cyclically so every rank gets ceil(n/world) samples and the
    last batch is filled the same way (no sample lost); `drop` keeps floor(n/world) per rank and
    whole batches only. Either way every rank has the same batch count.
    val/test: list order, rank r takes lines r, r+world, ...; the last batch is padded with PAD.
    """
    if split == "train":
        perm = np.random.default_rng([seed, epoch, 7]).permutation(num_videos)
        if uneven == "pad":
            per_rank = math.ceil(num_videos / world)
            nb = math.ceil(per_rank / batch)
            perm = np.resize(perm, per_rank * world)
        else:
            per_rank = num_videos // world
            nb = per_rank // batch
            perm = perm[: per_rank * world]
        mine = perm[rank::world]
        if len(mine) == 0:
            return mine
        return np.resize(mine, nb * batch)
    mine = np.arange(rank, num_videos, world)
    nb = math.ceil(len(mine) / batch)
    return np.concatenate([mine, np.full(nb * batch - len(mine), PAD, dtype=mine.dtype)])


def read_jpeg(name: str) -> bytes:
    """The whole file `name`, if it starts like a JPEG and ends with its end-of-image marker (one open).

    A clip's frames are read once for all of its frame samples (ClipSource._clip_frames), so every
    frame of the clip is checked (a replacement must cover the whole clip, not one frame). Damage
    inside the image data is only found by decoding it: prep.validate does that.
    """
    try:
        with open(name, "rb") as f:
            data = f.read()
    except OSError:
        raise VideoReadError(f"frame file {name} missing (folder shorter than listed?)") from None
    if not data:
        raise VideoReadError(f"frame file {name} is empty (0 bytes)")
    if data[:2] != b"\xff\xd8":
        raise VideoReadError(f"frame file {name} is not a JPEG (data.source: frames decodes JPEG only)")
    if not data[-64:].rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise VideoReadError(f"frame file {name} is a truncated JPEG (no end-of-image marker)")
    return data


SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame: baseline, progressive, ...


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame header, or None where the markers do not parse."""
    at = 2
    while at + 9 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in SOF_MARKERS:
            return int.from_bytes(data[at + 7 : at + 9], "big"), int.from_bytes(data[at + 5 : at + 7], "big")
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            at += 2
            continue
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return None


@dataclass
class SpatialOptions:
    input_size: int = 224
    scale_size: int = 256
    train_crop: str = "multiscale"
    crop_scales: tuple[float, ...] = (1.0, 0.875, 0.75, 0.66)
    flip: str = "on"
    flip_pairs: dict[int, int] = field(default_factory=dict)
    spatial_crops: int = 1
    full_res: bool = False

    @classmethod
    def from_config(
        cls, data: DataConfig, flip_pairs: dict[int, int] | None = None, views: EvalConfig | None = None
    ) -> SpatialOptions:
        """The data section's crop/flip fields; `views` (test mode only) adds the spatial test views."""
        return cls(
            input_size=data.input_size,
            scale_size=data.scale_size,
            train_crop=data.train_crop,
            crop_scales=tuple(data.crop_scales),
            flip=data.flip,
            flip_pairs=flip_pairs or {},
            spatial_crops=views.spatial_crops if views is not None else 1,
            full_res=views.full_res if views is not None else False,
        )

    @property
    def out_size(self) -> int:
        return self.scale_size if self.full_res else self.input_size


@dataclass
class ClipSource:
    """Picklable per-sample callback (runs in DALI worker processes; also usable serially)."""

    entries: list[Entry]
    kind: str  # pyav | bytes | frames
    split: str
    sampling: SamplingOptions
    spatial: SpatialOptions
    seed: int
    rank: int
    world: int
    batch: int  # videos per batch
    uneven: str = "pad"
    skip_bad: bool = False
    frame_template: str = "{:05d}.jpg"
    frame_start: int = 1
    device: str = "cpu"  # where kind "bytes" decodes: DALI's CPU decoder knows only DALI_CPU_CODECS
    trim: bool = True  # kind "bytes": send only the GOPs the wanted frames need (dali_pipes.trim)
    index: PacketIndex | None = None  # the list's persistent packet index (None: built per process)
    rotate: bool = False  # kind "pyav": apply display rotations instead of refusing them (predict)
    base_epoch: int = 0
    start_batch: int = 0
    owner_pid: int = field(default_factory=os.getpid)  # the trainer: workers die with it
    # list line -> why, for samples only DALI's decoder failed on (the loader fills it with skip_bad)
    known_bad: dict[int, str] = field(default_factory=dict, repr=False)
    _orders: dict = field(default_factory=dict, repr=False)
    # frame folders: the last clip's JPEGs and frame size, read once for all of its frame samples
    _clip: tuple = field(default=(), repr=False)

    @property
    def resizes(self) -> bool:
        """Whether the workers crop and resize (augment.crop_resize), leaving the graph to flip and
        normalise: the PyAV route in training, whose crops are whole pixels. It moves the resize out of
        the main process at a third of the CPU (docs/BENCHMARKS.md); eval keeps DALI's fractional crops."""
        return self.kind == "pyav" and self.split == "train"

    @property
    def group(self) -> int:
        """DALI samples per video: 1, or every frame of every clip for frame folders."""
        if self.kind != "frames":
            return 1
        return self.sampling.clips(self.split) * self.sampling.frames_per_clip

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(len(self.entries), self.split, self.seed, epoch, self.rank,
                                               self.world, self.batch, self.uneven)}  # fmt: skip
        return self._orders[epoch]

    def __call__(self, info) -> tuple:
        if os.getpid() != self.owner_pid:  # in a worker process (parallel external source)
            _enter_worker(self.owner_pid)
        epoch = self.base_epoch + info.epoch_idx
        skip = self.start_batch * self.batch * self.group if info.epoch_idx == 0 else 0
        pos, frame_k = divmod(skip + info.idx_in_epoch, self.group)
        order = self.order(epoch)
        if pos >= len(order):
            raise StopIteration
        sid = int(order[pos])
        out_id = sid
        if sid == PAD:
            sid = int(order[0])
        return self.load(sid, epoch, frame_k, out_id)

    def candidates(self, sid: int, epoch: int) -> list[int]:
        """List lines `load` tries for `sid`, in order: itself, then (skip_bad) 19 replacements."""
        if not self.skip_bad:
            return [sid]
        n = len(self.entries)
        return [sid] + [int(sample_rng(self.seed, epoch, sid, REPLACE + a).integers(n)) for a in range(19)]

    def readable(self, sid: int, epoch: int) -> bool:
        """Whether `load` would accept list line `sid` itself (the loader asks after DALI failed)."""
        try:
            self._load_one(sid, epoch, 0)
        except (VideoReadError, OSError):
            return False
        return True

    def load(self, sid: int, epoch: int, frame_k: int = 0, out_id: int | None = None) -> tuple:
        """The outputs for list line `sid`, or a deterministic replacement when skip_bad."""
        out_id = sid if out_id is None else out_id
        for tried in self.candidates(sid, epoch):
            try:
                outputs = self._load_one(tried, epoch, frame_k)
            except (VideoReadError, OSError) as e:
                entry = self.entries[tried]
                why = str(e).removeprefix(f"{entry.path}: ")  # video_io names the path too: once is enough
                msg = f"{entry.where}: bad sample {entry.path}: {why}"
                if not self.skip_bad:
                    raise ClipLoadError(msg) from None
                if frame_k == 0 and (entry.where, self.split) not in _WARNED:  # once, not every epoch
                    _WARNED.add((entry.where, self.split))
                    done = "replaced by another sample" if self.split == "train" else "left out of the scores"
                    log.warning("%s (data.skip_bad: %s, here and in later epochs)", msg, done)
                continue
            # A padding slot (out_id PAD) is dropped anyway: its replacement is not counted.
            replaced = np.array(int(tried != sid and out_id != PAD), dtype=np.int32)
            # train: the replacement's own line; eval: LEFT_OUT, so the loader drops it (each video once)
            replacement_id = tried if self.split == "train" else LEFT_OUT
            ident = np.array(out_id if tried == sid or out_id == PAD else replacement_id, dtype=np.int64)
            return (*outputs, ident, replaced)
        raise ClipLoadError(f"{self.entries[sid].where}: 20 replacement samples in a row were bad too")

    # ---- one sample ------------------------------------------------------------------------------

    def _video_index(self, entry: Entry, stamp: tuple[int, int] | None = None) -> VideoIndex:
        """The video's packet index: from the list's index file, or demuxed once in this process."""
        if self.index is None:
            self.index = PacketIndex(f"{entry.list_file}.index")
        if stamp is None and not os.path.isfile(entry.path):
            raise VideoReadError(f"{entry.path}: {not_a_file(entry.path)}")
        idx = self.index.get(entry.path, stamp)
        if idx.num_frames < entry.num_frames:
            raise VideoReadError(
                f"shorter than listed: {idx.num_frames} frames decodable, the list says {entry.num_frames}"
            )
        return idx

    def _clip_frames(self, entry: Entry, sid: int, epoch: int,
                     indices: np.ndarray) -> tuple[dict[int, bytes], tuple[int, int]]:  # fmt: skip
        """Every JPEG a frame-folder clip samples, each read and checked once for all of the clip's frame
        samples in this process (they come one after another), and the size of the folder's first frame."""
        if self._clip and self._clip[0] == (sid, epoch):
            return self._clip[1]
        if not os.path.isdir(entry.path):
            found = os.path.isfile(entry.path)
            raise VideoReadError("is a file, not a frame folder" if found else "frame folder not found")
        name = os.path.join(entry.path, self.frame_template)
        jpegs = {i: read_jpeg(name.format(self.frame_start + i)) for i in dict.fromkeys(indices.tolist())}
        first = jpegs.get(0) or read_jpeg(name.format(self.frame_start))
        size = jpeg_size(first)
        if size is None:  # markers this parser does not follow: ask PIL
            from PIL import Image

            with Image.open(io.BytesIO(first)) as im:
                size = im.size
        self._clip = ((sid, epoch), (jpegs, size))
        return jpegs, size

    def _load_one(self, sid: int, epoch: int, frame_k: int) -> tuple:
        entry = self.entries[sid]
        if sid in self.known_bad:
            raise VideoReadError(self.known_bad[sid])
        indices = clip_indices(entry.num_frames, self.split, self.sampling, self.seed, epoch, sid).ravel()
        if self.kind == "frames":  # the whole clip is checked: its frame samples agree on replacement
            jpegs, (width, height) = self._clip_frames(entry, sid, epoch, indices)
            payload: tuple = (np.frombuffer(jpegs[int(indices[frame_k])], dtype=np.uint8),)
        elif self.kind == "pyav":
            idx = self._video_index(entry)
            frames = decode_frames(entry.path, indices, idx, rotate=self.rotate)
            height, width = frames.shape[1:3]
            payload = (frames,)
        else:  # bytes for fn.decoders.video; the index check keeps DALI from padding black frames
            payload, (width, height) = self._encoded(entry, indices)
        rois, mirror, label = self.spatial_params(width, height, entry.label, epoch, sid)
        if self.resizes:
            payload = (crop_resize(payload[0], rois[0], self.spatial.out_size),)
        return (*payload, rois, mirror, np.array(label, dtype=np.int64))

    def _encoded(self, entry: Entry, indices: np.ndarray) -> tuple[tuple, tuple[int, int]]:
        """(encoded bytes, frame indices into them) for DALI's decoder, and the frame size.

        The file is opened once: its fstat checks the packet index is current, and with trimming only
        the byte ranges of the needed GOPs are read from it (else the whole file).
        """
        if not os.path.isfile(entry.path):
            raise VideoReadError(f"{entry.path}: {not_a_file(entry.path)}")
        fd = os.open(entry.path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            idx = self._video_index(entry, (st.st_size, st.st_mtime_ns))
            if idx.rotation:
                raise VideoReadError(rotation_refused(idx.rotation))
            if self.device == "cpu" and idx.codec not in DALI_CPU_CODECS:
                raise VideoReadError(
                    f"codec {idx.codec} is not supported by DALI's CPU video decoder (VP8/VP9/MJPEG); "
                    "use data.cpu_decoder: pyav"
                )
            if self.trim:
                data, frames = trim(entry.path, idx, indices, fd)
            else:
                data = np.frombuffer(os.pread(fd, st.st_size, 0), dtype=np.uint8)
                frames = indices.astype(np.int32)
        finally:
            os.close(fd)
        return (data, frames), (idx.width, idx.height)

    def spatial_params(self, width: int, height: int, label: int, epoch: int, sid: int) -> tuple:
        """Relative crop boxes (crops, 4), mirror flag and (possibly swapped) label for one video."""
        sp = self.spatial
        if self.split == "train":
            rng = sample_rng(self.seed, epoch, sid, SPATIAL)
            if sp.train_crop == "multiscale":
                box = multiscale_crop(width, height, sp.input_size, rng, tuple(sp.crop_scales))
            else:
                box = random_resized_crop(width, height, rng)
            mirror, label = flip_and_label(sp.flip, sp.flip_pairs, label, rng)
            boxes = [box]
        else:
            crops = sp.spatial_crops if self.split == "test" else 1
            boxes = eval_crops(width, height, sp.out_size, sp.scale_size, crops)
            mirror = 0
        rois = np.array([to_roi(b, width, height) for b in boxes], dtype=np.float32)
        return rois, np.array(mirror, dtype=np.int32), label
