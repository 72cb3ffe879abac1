"""Prediction on videos that are in no list: find them, count their frames, score them through the test
pipeline, turn the fused scores into top-k labels and write them out. predict.py is the command line;
`Predictor` is the same for one's own Python code (`Predictor(checkpoint)(video) -> top-k`).

The videos go through the same path as a test run: a temporary list ("path frames 0" lines, the frame
counts probed here with prep.probe), dali_pipes' test loader and engine.scoring.evaluate_model, so a
video's probabilities are exactly evaluate.py's softmax for the same views. Unreadable files are
reported and skipped: those that fail to probe before anything is built, those that fail to decode in
the loader through data.skip_bad (the loader drops them; their ids are missing from the result).
"""

from __future__ import annotations

import copy
import csv
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.config import Config, ConfigError, EvalConfig
from engine.fileio import atomic_write
from engine.scoring import evaluate_model, softmax

OUT_FORMATS = (".csv", ".json")


@dataclass
class VideoResult:
    """One input video: its frame count and top-k, or why it was skipped."""

    path: str
    frames: int = 0
    topk: list[tuple[int, str, float]] = field(default_factory=list)  # (class id, name, probability)
    error: str = ""
    note: str = ""  # a problem that did not stop it (decoding stopped early: fewer frames used)


def _list_line_path(line: str) -> str:
    """The path of a list line: 'path frames label' (a prep.lists list) or a bare path."""
    parts = line.rsplit(maxsplit=2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].lstrip("-").isdigit():
        return parts[0]
    return line


def collect_videos(target: str | Path, root: str | Path | None = None) -> list[Path]:
    """A video file, a folder (its video files, recursively, sorted) or a list file (one video per line).

    A list's relative paths are taken from `root`, else from the list's folder. A list is a .txt/.lst/.csv
    file (a video container is never one of those).
    """
    from prep.common import VIDEO_EXTENSIONS

    target = Path(target)
    if target.is_dir():
        found = sorted(p for p in target.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
        if not found:
            raise ConfigError(f"{target}: no video files in this folder ({', '.join(VIDEO_EXTENSIONS)})")
        return found
    if not target.exists():
        raise ConfigError(f"{target}: no such video, folder or list file")
    if target.suffix.lower() in (".txt", ".lst", ".csv"):
        base = Path(root) if root else target.parent
        lines = [ln.strip() for ln in target.read_text().splitlines()]
        paths = [base / _list_line_path(ln) for ln in lines if ln and not ln.startswith("#")]
        if not paths:
            raise ConfigError(f"{target}: the list names no videos")
        return paths
    return [target]


def probe_frames(path: Path) -> tuple[int, str]:
    """(decodable frames, note) of a video; raises ValueError naming why it cannot be used at all."""
    from prep.probe import ProbeError, probe_video

    try:
        info = probe_video(path, count="decode")
    except ProbeError as e:
        raise ValueError(str(e)) from None
    if info.num_frames < 1:
        raise ValueError(f"no decodable frames ({info.decode_error or 'empty video stream'})")
    note = (
        f"decoding stopped after {info.num_frames} frames ({info.decode_error})" if info.decode_error else ""
    )
    return info.num_frames, note


def probabilities(scores: np.ndarray, fuse: str) -> np.ndarray:
    """Fused scores -> class probabilities: softmax of the mean logits, or the mean softmax as it is."""
    return scores.astype(np.float64) if fuse == "softmax" else softmax(scores.astype(np.float64))


def top_k(probs: np.ndarray, names: list[str] | None, k: int) -> list[tuple[int, str, float]]:
    """The k most probable classes of one video, most probable first (ties: the lower class id)."""
    order = np.argsort(-probs, kind="stable")[: min(k, len(probs))]
    return [(int(c), names[c] if names else str(int(c)), float(probs[c])) for c in order]


def _report_batches(batches: Iterable[dict], on_done: Callable[[list[int]], None]) -> Iterator[dict]:
    """`batches`, calling on_done(ids) once the scorer comes back for the next batch (this one is scored)."""
    pending: list[int] | None = None
    for batch in batches:
        if pending is not None:
            on_done(pending)
        pending = batch["ids"].reshape(-1).tolist()
        yield batch
    if pending is not None:
        on_done(pending)


def score_videos(
    model: nn.Module,
    cfg: Config,
    videos: list[tuple[Path, int]],
    views: EvalConfig,
    amp: str,
    device_id: int | None,
    on_done: Callable[[list[int]], None] = lambda ids: None,
    per_view: bool = False,
) -> dict[int, np.ndarray]:
    """Class probabilities of each (path, frames) video, by its index in `videos`; an index missing from
    the result is a video the loader could not decode (skipped through data.skip_bad, warned there).
    `per_view`: each video's unfused (views, classes) logits instead (the timeline's windows).

    Paths that resolve to one file (a symbolic link beside its target) are decoded once and each gets
    the scores under its own name (a list holds each file once). Rotated videos are turned upright on
    the PyAV route (build_loader's rotate); the NVDEC route refuses them with its reason.
    """
    from dali_pipes.loader import build_loader

    owners: dict[str, list[int]] = {}  # resolved file -> indices in `videos`
    for i, (path, _) in enumerate(videos):
        owners.setdefault(os.path.realpath(path), []).append(i)
    files = list(owners)
    frames_of = {os.path.realpath(path): frames for path, frames in videos}
    with tempfile.TemporaryDirectory(prefix="predict-") as tmp:
        listing = Path(tmp) / "videos.txt"
        listing.write_text("".join(f"{f} {frames_of[f]} 0\n" for f in files))
        data = replace(cfg.data, val_list=str(listing), root="", skip_bad=True)
        loader = build_loader(data, "test", views=views, device_id=device_id, rotate=True)

        def done(ids: list[int]) -> None:
            on_done([i for u in ids for i in owners[files[u]]])

        try:
            result = evaluate_model(
                model, _report_batches(loader, done), cfg.model.num_classes, views.fuse, amp,
                cfg.train.channels_last,
            )  # fmt: skip
        finally:
            loader.close()
    probs = result.view_logits if per_view else probabilities(result.scores, views.fuse)
    return {i: p for u, p in zip(result.ids, probs, strict=True) for i in owners[files[int(u)]]}


def write_predictions(out: str | Path, results: list[VideoResult], meta: dict) -> Path:
    """CSV (one row per video and rank; a skipped video is one row with its error) or JSON, atomically."""
    out = Path(out)
    if out.suffix.lower() == ".json":
        doc = {
            **meta,
            "videos": [
                {"video": r.path, "frames": r.frames,
                 "topk": [{"class_id": c, "class": n, "probability": p} for c, n, p in r.topk],
                 **({"note": r.note} if r.note else {})}
                for r in results if not r.error
            ],
            "failed": [{"video": r.path, "error": r.error} for r in results if r.error],
        }  # fmt: skip
        return atomic_write(out, lambda f: f.write(json.dumps(doc, indent=2) + "\n"), binary=False)
    if out.suffix.lower() != ".csv":
        raise ConfigError(f"--out: {out} must end in {' or '.join(OUT_FORMATS)}")

    def rows(f) -> None:
        w = csv.writer(f)
        w.writerow(["video", "frames", "rank", "class_id", "class", "probability", "error"])
        for r in results:
            if r.error:
                w.writerow([r.path, "", "", "", "", "", r.error])
            for rank, (c, name, p) in enumerate(r.topk, start=1):
                w.writerow([r.path, r.frames, rank, c, name, f"{p:.6f}", ""])

    return atomic_write(out, rows, binary=False)


# --------------------------------------------------------------------------------------------------
# From a checkpoint to a scoring model: shared by `python -m predict` and `Predictor`
# --------------------------------------------------------------------------------------------------


def resolve_config(checkpoint: str, ckpt: dict, config: str | None, overrides: list[str]) -> Config:
    """`config` when given, else the checkpoint's stored training config; overrides apply to either."""
    from engine.config import apply_overrides, from_dict, load_config

    if config:
        return load_config(config, overrides)
    if "config" not in ckpt:
        raise ConfigError(
            f"{checkpoint} stores no config (a models.convert output?): name the recipe with --config"
        )
    try:
        return from_dict(apply_overrides(copy.deepcopy(ckpt["config"]), overrides))
    except ConfigError as e:
        raise ConfigError(f"{checkpoint} (stored config): {e}") from None


def pick_device(cfg: Config, say: Callable[[str], None]) -> tuple[Config, torch.device, int | None]:
    """NVDEC and the GPU when the config asks for them and one is here; otherwise the PyAV CPU route,
    which reads every codec (DALI's CPU decoder reads only VP8/VP9/MJPEG)."""
    if cfg.data.device == "gpu" and torch.cuda.is_available():
        device_id = torch.cuda.current_device()
        return cfg, torch.device("cuda", device_id), device_id
    if cfg.data.device == "gpu":
        say("no CUDA device here: decoding with PyAV and scoring on the CPU (data.device=cpu)")
    return replace(cfg, data=replace(cfg.data, device="cpu", cpu_decoder="pyav")), torch.device("cpu"), None


def inference_model(
    cfg: Config, ckpt: dict, checkpoint: str, weights: str, device: torch.device
) -> nn.Module:
    """The configured network with the checkpoint's `weights` ("model" or "ema"), strict, on `device`."""
    from engine.channels_last import model_channels_last
    from engine.checkpoint import load_model_weights
    from models import build_model

    model = build_model(replace(cfg.model, pretrained=""))  # the checkpoint brings all weights
    load_model_weights(model, ckpt, checkpoint, weights)
    model.to(device)
    return model_channels_last(model) if cfg.train.channels_last else model


class Predictor:
    """Top-k labels for videos from one's own code, through the same path as `python -m predict`:

        from engine.inference import Predictor
        p = Predictor("runs/tsm_k400")           # a run folder (its ckpt_best.pt, else newest) or a file
        p("clip.mp4")                            # -> [(class id, class name, probability), ...], top 5
        p.predict(["a.mp4", "b.mp4"])            # -> [VideoResult], unreadable videos with their error

    The model and config load once; each call probes the videos' frame counts and scores them through the
    test pipeline of the config (its eval: views, or `views="3x10"`). A video that cannot be read raises
    ValueError from `__call__` (naming it) and is an error result from `predict`."""

    def __init__(
        self, checkpoint: str | Path, config: str | None = None, overrides: list[str] | tuple[str, ...] = (),
        views: str | None = None, topk: int = 5, classes: str = "", weights: str = "model",
        amp: str | None = None, say: Callable[[str], None] = lambda text: None,
    ) -> None:  # fmt: skip
        from engine.checkpoint import load_checkpoint, run_checkpoint
        from engine.config import parse_views
        from engine.reports import read_class_names

        if topk < 1:
            raise ConfigError(f"topk: must be >= 1, got {topk}")
        path, why = run_checkpoint(checkpoint)
        self.checkpoint = str(path)
        say(f"checkpoint {path} ({why})")
        overrides = list(overrides)
        if views:
            crops, clips = parse_views(views)
            overrides += [f"--eval.spatial_crops={crops}", f"--eval.temporal_clips={clips}"]
        ckpt = load_checkpoint(path)
        cfg = resolve_config(self.checkpoint, ckpt, config, overrides)
        self.cfg, self.device, self.device_id = pick_device(cfg, say)
        if self.cfg.train.threads > 0:
            torch.set_num_threads(self.cfg.train.threads)
        self.views = self.cfg.eval.resolved(self.cfg.data.sampling)
        self.names = read_class_names(self.cfg.model.num_classes, classes, self.cfg)
        self.amp = amp or self.cfg.train.amp
        self.topk = topk
        self.model = inference_model(self.cfg, ckpt, self.checkpoint, weights, self.device)

    def predict(
        self, videos: Iterable[str | Path], on_done: Callable[[list[int]], None] = lambda ids: None
    ) -> list[VideoResult]:
        """A result per video, in order: its frames and top-k, or the error that skipped it."""
        results = []
        for video in videos:
            try:
                frames, note = probe_frames(Path(video))
                results.append(VideoResult(str(video), frames, note=note))
            except ValueError as e:
                results.append(VideoResult(str(video), error=str(e)))
        todo = [r for r in results if not r.error]
        if not todo:
            return results
        frames = [(Path(r.path), r.frames) for r in todo]
        probs = score_videos(self.model, self.cfg, frames, self.views, self.amp, self.device_id, on_done)
        for i, r in enumerate(todo):
            if i in probs:
                r.topk = top_k(probs[i], self.names, self.topk)
            else:
                r.error = "could not be decoded by the test pipeline (see the warning above)"
        return results

    def __call__(self, video: str | Path) -> list[tuple[int, str, float]]:
        (result,) = self.predict([video])
        if result.error:
            raise ValueError(f"{video}: {result.error}")
        return result.topk


# --------------------------------------------------------------------------------------------------
# A long video over time: sliding windows through the test pipeline
# --------------------------------------------------------------------------------------------------


@dataclass
class Window:
    """One scored window of a long video: its first and last frame and its top-k."""

    start: int
    end: int
    topk: list[tuple[int, str, float]]


def timeline_views(frames: int, window: int, stride: int) -> EvalConfig:
    """Windows of `window` frames whose starts are at most `stride` apart: N = 1 + ceil((F - window) /
    stride) dense clips, starts spread evenly from frame 0 to F - window (the dense test rule)."""
    if window < 1 or stride < 1:
        raise ConfigError(f"--window and --stride must be >= 1, got {window} and {stride}")
    clips = 1 + max(0, -(-(frames - window) // stride))
    return EvalConfig(spatial_crops=1, temporal_clips=clips, temporal_mode="dense")


def score_timeline(
    p: Predictor, video: str | Path, window: int, stride: int
) -> tuple[list[Window], np.ndarray]:
    """Each window's top-k and the (windows, classes) probabilities of one video, scored by `p`'s model
    through the test loader with dense sampling: window = data.dense_window frames, T of them sampled
    (every window // T-th); a window's probabilities are the softmax of its own logits."""
    from dali_pipes.loader import sampling_options
    from dali_pipes.sampling import clip_indices

    if window < p.cfg.data.num_segments:
        segments = p.cfg.data.num_segments
        raise ConfigError(f"--window: {window} frames cannot hold data.num_segments = {segments}")
    path = Path(video)
    frames, _ = probe_frames(path)
    views = timeline_views(frames, window, stride)
    data = replace(p.cfg.data, sampling="dense", dense_window=window)
    cfg = replace(p.cfg, data=data)
    logits = score_videos(p.model, cfg, [(path, frames)], views, p.amp, p.device_id, per_view=True)
    if 0 not in logits:
        raise ValueError(f"{path}: could not be decoded by the test pipeline (see the warning above)")
    probs = softmax(logits[0])
    spans = clip_indices(frames, "test", sampling_options(data, views), seed=data.seed, epoch=0, sample_id=0)
    windows = [
        Window(int(idx.min()), int(idx.max()), top_k(pr, p.names, p.topk))
        for idx, pr in zip(spans.reshape(len(probs), -1), probs, strict=True)
    ]
    return windows, probs


def write_timeline(out: str | Path, video: str, windows: list[Window], meta: dict) -> Path:
    """Per-window top-k: CSV (a row per window and rank) or JSON, atomically."""
    out = Path(out)
    if out.suffix.lower() == ".json":
        doc = {**meta, "video": video, "windows": [
            {"start_frame": w.start, "end_frame": w.end,
             "topk": [{"class_id": c, "class": n, "probability": pr} for c, n, pr in w.topk]}
            for w in windows
        ]}  # fmt: skip
        return atomic_write(out, lambda f: f.write(json.dumps(doc, indent=2) + "\n"), binary=False)
    if out.suffix.lower() != ".csv":
        raise ConfigError(f"--out: {out} must end in {' or '.join(OUT_FORMATS)}")

    def rows(f) -> None:
        w = csv.writer(f)
        w.writerow(["video", "window", "start_frame", "end_frame", "rank", "class_id", "class",
                    "probability"])  # fmt: skip
        for i, win in enumerate(windows):
            for rank, (c, name, pr) in enumerate(win.topk, start=1):
                w.writerow([video, i, win.start, win.end, rank, c, name, f"{pr:.6f}"])

    return atomic_write(out, rows, binary=False)


def timeline_command(
    p: Predictor, video: str, window: int, stride: int, png: str, out: str | None, say: Callable[[str], None],
    render: str | None = None,
) -> None:
    """`python -m predict CKPT VIDEO --timeline PNG [--out CSV|JSON] [--render OUT.mp4]`: the windows'
    top-k printed, the picture, the table and the labelled video written (atomically)."""
    from engine.plot import plot_timeline

    windows, probs = score_timeline(p, video, window, stride)
    for i, w in enumerate(windows):
        best = ", ".join(f"{name} {100 * pr:.1f}%" for _, name, pr in w.topk[:3])
        say(f"window {i} frames {w.start}-{w.end}: {best}")
    names = p.names or [str(c) for c in range(p.cfg.model.num_classes)]
    spans = [(w.start, w.end) for w in windows]
    title = f"{Path(video).name}: {len(windows)} windows of {window} frames, {p.cfg.model.name}"
    atomic_write(png, lambda f: plot_timeline(spans, probs, names, title, f))
    say(f"wrote {png}")
    if out:
        meta = {"checkpoint": p.checkpoint, "model": p.cfg.model.name, "window": window, "stride": stride}
        say(f"wrote {write_timeline(out, str(video), windows, meta)}")
    if render:
        frames, _ = probe_frames(Path(video))
        say(f"wrote {render_timeline(video, windows, frames, render)}")


def frame_ranges(windows: list[Window], frames: int) -> list[tuple[int, int]]:
    """The frames each window labels in a rendered video: from midway to the previous window's centre
    to midway to the next one's (the nearest window's labels on every frame), covering 0..frames-1."""
    centres = [(w.start + w.end) / 2 for w in windows]
    cuts = [0] + [int((a + b) / 2) + 1 for a, b in zip(centres, centres[1:], strict=False)] + [frames]
    return [(lo, hi - 1) for lo, hi in zip(cuts, cuts[1:], strict=False)]


def render_timeline(video: str | Path, windows: list[Window], frames: int, out: str | Path) -> Path:
    """OUT (.mp4): the video with each frame's top-k labels (its nearest window's) drawn at the top left,
    by ffmpeg's drawtext (H.264, no audio), written to a temp file beside OUT and moved into place. The
    labels go through text files, so no class name needs escaping in the filter graph."""
    import shutil
    import subprocess

    out = Path(out)
    if out.suffix.lower() != ".mp4":
        raise ConfigError(f"--render: {out} must end in .mp4")
    if shutil.which("ffmpeg") is None:
        raise ConfigError("--render: ffmpeg is not on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="render-") as tmp:
        filters = []
        for i, (w, (lo, hi)) in enumerate(zip(windows, frame_ranges(windows, frames), strict=True)):
            text = Path(tmp) / f"w{i}.txt"
            text.write_text("\n".join(f"{r}. {name} {100 * pr:.0f}%" for r, (_, name, pr) in
                                      enumerate(w.topk, start=1)))  # fmt: skip
            filters.append(
                f"drawtext=textfile='{text}':expansion=none:font=Sans:fontsize=16:fontcolor=white:box=1:"
                f"boxcolor=black@0.6:boxborderw=4:x=8:y=8:enable='between(n,{lo},{hi})'"
            )
        script = Path(tmp) / "filters.txt"
        even = "scale=trunc(iw/2)*2:trunc(ih/2)*2"  # H.264 in yuv420p needs even sides
        script.write_text(",\n".join([*filters, even]))
        part = out.with_name(f".{out.name}.{os.getpid()}.tmp.mp4")
        cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-y", "-i", str(video),
               "-filter_script:v", str(script), "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p",
               str(part)]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                first = (proc.stderr.strip().splitlines() or ["no message"])[-1]
                raise ValueError(f"--render: ffmpeg failed on {video}: {first}")
            os.replace(part, out)
        finally:
            part.unlink(missing_ok=True)
    return out
