"""The dataset fingerprint: which data a run saw, in one line two labs can compare.

`digest` is a short hash over every list line as written, each file's size and its packet-index
digest (packet_index.digest: every packet's timestamps, offset, size, flags and payload CRC-32, plus
the stream's codec, frame size, time base and extradata), so one changed list line or one changed byte
of a video's payload changes it; paths are hashed as the list writes them (relative), so the same data
in another folder hashes the same.
Beside it: counts (videos, classes, bad = files that cannot be indexed), the sampler and the eval
protocol. It is computed from the list's packet index (`LIST.index`, built by demuxing when missing;
nothing is decoded). train.py writes it to metrics.jsonl and every checkpoint; evaluate.py and
predict print it; `python -m prep.audit LIST --fingerprint` prints it alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.config import DataConfig, EvalConfig

from .listfile import read_list
from .packet_index import PacketIndex, file_stamp, index_path_for
from .video_io import VideoReadError

DIGEST_CHARS = 12


@dataclass(frozen=True)
class Fingerprint:
    digest: str
    videos: int
    classes: int
    bad: int
    sampler: str
    eval: str

    def line(self) -> str:
        return (f"data {self.digest}: {self.videos} videos, {self.classes} classes, {self.bad} bad | "
                f"sampler {self.sampler} | eval {self.eval}")  # fmt: skip

    def as_dict(self) -> dict:
        return asdict(self)


def sampler_text(data: DataConfig) -> str:
    """The training sampler in a few words (what decides which frames a clip holds)."""
    if data.sampling == "clip3d":
        return f"clip3d {data.clip_len}x{data.frame_interval}"
    text = f"{data.sampling} T={data.num_segments}"
    if data.snippet_len > 1:
        text += f" L={data.snippet_len}"
    if data.sampling == "dense":
        text += f" window={data.dense_window} span={data.dense_span} val={data.val_sampling}"
    return text


def eval_text(data: DataConfig, views: EvalConfig) -> str:
    v = views.resolved(data.sampling)
    res = " full-res" if v.full_res else ""
    return f"{v.spatial_crops}x{v.temporal_clips} {v.temporal_mode}{res} fuse {v.fuse} crop {data.input_size}"


def list_fingerprint(
    list_path: str | Path, data: DataConfig | None = None, views: EvalConfig | None = None
) -> Fingerprint:
    """The fingerprint of one list (read with data.root); builds missing packet-index entries.

    Raises ListFileError for a bad list (naming file:line).
    """
    data = data or DataConfig()
    entries = read_list(list_path, data.root)
    index = PacketIndex(index_path_for(list_path))
    h = hashlib.sha256()
    bad = 0
    for e in entries:
        try:
            stamp = file_stamp(e.path)
            size, digest = stamp[0], index.digest(e.path, stamp)
        except (OSError, VideoReadError):
            size, digest, bad = -1, "unreadable", bad + 1
        h.update(f"{e.text}\0{size}\0{digest}\n".encode())
    index.save()  # the entries demuxed here, for the next run
    return Fingerprint(
        h.hexdigest()[:DIGEST_CHARS], len(entries), len({e.label for e in entries}), bad,
        sampler_text(data), eval_text(data, views or EvalConfig()),
    )  # fmt: skip


def run_fingerprints(data: DataConfig, views: EvalConfig) -> dict[str, dict]:
    """{"train": ..., "val": ...} for the lists a training run uses (JPEG-folder lists: not covered)."""
    if data.source != "video":
        return {}
    lists = {"train": data.train_list, "val": data.val_list}
    return {k: list_fingerprint(p, data, views).as_dict() for k, p in lists.items() if p}


def describe(name: str, fp: dict) -> str:
    """One console line for a stored fingerprint dict."""
    return f"{name}: {Fingerprint(**fp).line()}"


def differs(scored: dict, validated: dict | None) -> str | None:
    """One line when the list scored is not the one the checkpoint validated on (None when it is, or
    when the checkpoint records none)."""
    if not validated or validated.get("digest") == scored.get("digest"):
        return None
    now, then = f"data {scored['digest']}, {scored['videos']} videos", f"data {validated['digest']}"
    return f"the list scored ({now}) differs from the one the checkpoint validated on ({then})"
