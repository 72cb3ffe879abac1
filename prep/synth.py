"""The embedded demo dataset: short VP9 clips whose class is defined by motion alone.

    python -m prep.synth OUT [--classes ...] [--per-class 64] [--val-per-class 16] [--size 64] [--frames 8]

Each clip shows one textured shape on a textured static background. Shape, colours, textures, size,
position and speed are random per clip; only the motion tells the class. Every class is either a
base motion (move_right, move_down, grow, rotate_cw) or the exact time reverse of one (move_left,
move_up, shrink, rotate_ccw): a reversed class is rendered by drawing the base motion's parameters and
playing the frames backwards. So the frames of a class and of its reverse have the same distribution
and a frame-order-blind model (TSN with average consensus) is at chance on each reverse pair, while a
temporal model (TSM) can learn everything. A horizontal flip turns move_left into move_right and
rotate_cw into rotate_ccw; flip_pairs.txt lists those label pairs for label-swapping flips.

Writes OUT/videos/<class>/{train,val}_NNNN.webm, OUT/train.txt, OUT/val.txt (real decoded frame
counts), OUT/classes.txt, OUT/flip_pairs.txt and OUT/synth.json (the options; written last as the
completion mark). Deterministic: the pixels of every clip depend only on (seed, class, split, index).
Running it again on a complete OUT does nothing; an interrupted run resumes (finished clips are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np

from engine.config import DefaultsHelpFormatter
from prep.common import (
    UserError,
    atomic_write_text,
    create_exclusive,
    default_jobs,
    parallel_map,
    positive_int,
    run_cli,
)
from prep.probe import ProbeError, probe_video

BASE_MOTIONS = ("move_right", "move_down", "grow", "rotate_cw")
REVERSE_OF = {"move_left": "move_right", "move_up": "move_down", "shrink": "grow", "rotate_ccw": "rotate_cw"}
ALL_CLASSES = (
    "move_left",
    "move_right",
    "move_up",
    "move_down",
    "grow",
    "shrink",
    "rotate_cw",
    "rotate_ccw",
)
# The demo's classes: the debug TSM at 32 px learns the other three pairs in 1-2 epochs and leaves the
# rotation pair at chance for 6 (docs/TRAINING.md, "The demo"), so rotation is opt-in (--classes).
DEFAULT_CLASSES = ALL_CLASSES[:6]
FLIP_PAIRS = (("move_left", "move_right"), ("rotate_cw", "rotate_ccw"))
SHAPES = ("rectangle", "ellipse", "triangle", "cross", "half_disc")
TEXTURES = ("stripes", "checker", "two_tone")
BACKGROUNDS = ("blobs", "stripes", "checker")
GOP = 16
SPLIT_CODES = {"train": 0, "val": 1}


@dataclass(frozen=True)
class SynthOptions:
    classes: tuple[str, ...]
    per_class: int
    val_per_class: int
    size: int
    frames: int
    seed: int
    crf: int


# ---------------------------------------------------------------------------------------- rendering


def _colour_with_luma(rng: np.random.Generator, luma: float) -> np.ndarray:
    """A random colour whose luma (BT.601) is about `luma`: contrast stays high whatever the hue."""
    c = rng.uniform(0, 255, 3)
    c = c + (luma - (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]))
    return np.clip(c, 0, 255)


def _background(rng: np.random.Generator, size: int, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    """A static textured background (size, size, 3) float32 mixing two colours."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    if kind == "blobs":  # smooth random field: a coarse grid, bilinearly upsampled
        n = int(rng.integers(3, 7))
        grid = rng.uniform(0, 1, (n + 1, n + 1)).astype(np.float32)
        gy, gx = yy / size * n, xx / size * n
        y0, x0 = np.floor(gy).astype(int), np.floor(gx).astype(int)
        fy, fx = gy - y0, gx - x0
        top = grid[y0, x0] * (1 - fx) + grid[y0, x0 + 1] * fx
        bottom = grid[y0 + 1, x0] * (1 - fx) + grid[y0 + 1, x0 + 1] * fx
        mix = top * (1 - fy) + bottom * fy
    elif kind == "stripes":
        angle, period = rng.uniform(0, np.pi), rng.uniform(0.06, 0.18) * size
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) / period
        mix = 0.5 + 0.5 * np.sin(2 * np.pi * phase)
    else:
        cell = rng.uniform(0.06, 0.15) * size
        mix = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float32)
    return (c1 * (1 - mix[..., None]) + c2 * mix[..., None]).astype(np.float32)


def _shape_distance(shape: str, u: np.ndarray, v: np.ndarray, r: np.ndarray, aspect: float) -> np.ndarray:
    """Approximate signed distance in pixels (negative inside) of a shape of half-extent r at the origin."""
    if shape == "rectangle":
        return np.maximum(np.abs(u) - r, np.abs(v) - r * aspect)
    if shape == "ellipse":
        b = r * aspect
        return (np.sqrt((u / r) ** 2 + (v / b) ** 2) - 1) * b
    if shape == "triangle":  # equilateral, pointing along +u
        d = -u - 0.5 * r
        for a in (np.pi / 3, -np.pi / 3):
            d = np.maximum(d, u * np.cos(a) + v * np.sin(a) - 0.5 * r)
        return d
    if shape == "cross":
        arm = 0.38 * r
        bar1 = np.maximum(np.abs(u) - r, np.abs(v) - arm)
        bar2 = np.maximum(np.abs(u) - arm, np.abs(v) - r)
        return np.minimum(bar1, bar2)
    # half_disc: the disc's half with u > -0.2 r (no rotational symmetry at all)
    return np.maximum(np.sqrt(u**2 + v**2) - r, -u - 0.2 * r)


def _texture(kind: str, u: np.ndarray, v: np.ndarray, r: np.ndarray, period: float) -> np.ndarray:
    """0/1 pattern in the object's own coordinates, so it turns and scales with the object."""
    if kind == "stripes":
        return (np.sin(2 * np.pi * u / (period * r)) > 0).astype(np.float32)
    if kind == "checker":
        return ((np.floor(u / (period * r)) + np.floor(v / (period * r))) % 2).astype(np.float32)
    return (v > 0).astype(np.float32)  # two_tone


def render_clip(class_name: str, rng: np.random.Generator, size: int, frames: int) -> np.ndarray:
    """(frames, size, size, 3) uint8 RGB frames of one clip of `class_name`, drawn from `rng`."""
    base = REVERSE_OF.get(class_name, class_name)
    if base not in BASE_MOTIONS:
        raise ValueError(f"unknown class {class_name!r}")
    s = float(size)
    t = np.linspace(0.0, 1.0, frames, dtype=np.float32)  # clip time 0..1

    # Appearance: high luma contrast between object and background, random hues and patterns.
    bg_luma = rng.uniform(50, 205)
    obj_luma = bg_luma + rng.choice([-1, 1]) * rng.uniform(75, 110)
    obj_luma = obj_luma if 15 <= obj_luma <= 240 else bg_luma - np.sign(obj_luma - bg_luma) * 90
    # The background texture is kept low-contrast (two close colours) so that the object stands out.
    bg_colour = _colour_with_luma(rng, bg_luma)
    background = _background(rng, size, bg_colour, np.clip(bg_colour + rng.uniform(-35, 35, 3), 0, 255))
    obj_a = _colour_with_luma(rng, obj_luma)
    obj_b = _colour_with_luma(rng, obj_luma + rng.choice([-1, 1]) * rng.uniform(25, 45))
    shape = SHAPES[rng.integers(len(SHAPES))]
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    aspect = float(rng.uniform(0.55, 0.8))
    period = float(rng.uniform(0.5, 0.9))  # texture period relative to the object size
    angle0 = float(rng.uniform(0, 2 * np.pi))

    # Motion of the base class; the reverse classes play it backwards (same frame distribution).
    r = np.full(frames, rng.uniform(0.18, 0.22) * s, dtype=np.float32)
    angle = np.full(frames, angle0, dtype=np.float32)
    if base in ("move_right", "move_down"):
        travel = rng.uniform(0.45, 0.55) * s
        along = rng.uniform(r[0], s - r[0] - travel) + travel * t
        across = np.full(frames, rng.uniform(r[0], s - r[0]), dtype=np.float32)
        cx, cy = (along, across) if base == "move_right" else (across, along)
    else:
        if base == "grow":
            r0, ratio = rng.uniform(0.12, 0.15) * s, rng.uniform(1.8, 2.2)
            r = (r0 * ratio**t).astype(np.float32)
        else:  # rotate_cw: 150..195 degrees over the clip; in image coordinates (y down) +angle is clockwise
            # (8 TSN segments sample frames at most 2F/8 - 1 apart, so a turn between sampled frames
            # stays under 45 degrees for any F >= 8: a 4-fold symmetric cross never aliases)
            total = np.deg2rad(rng.uniform(150.0, 195.0))
            angle = (angle0 + total * t).astype(np.float32)
        margin = float(r.max()) * 1.05
        cx = np.full(frames, rng.uniform(margin, s - margin), dtype=np.float32)
        cy = np.full(frames, rng.uniform(margin, s - margin), dtype=np.float32)
    if class_name != base:
        cx, cy, r, angle = cx[::-1], cy[::-1], r[::-1], angle[::-1]

    # Object coordinates for every frame at once: (frames, size, size).
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos
    rr = r[:, None, None]
    coverage = np.clip(0.5 - _shape_distance(shape, u, v, rr, aspect), 0.0, 1.0)[..., None]
    pattern = _texture(texture, u, v, rr, period)[..., None]
    colour = obj_a * (1 - pattern) + obj_b * pattern
    video = background[None] * (1 - coverage) + colour * coverage
    return np.clip(np.rint(video), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------ writing


def clip_rng(seed: int, class_name: str, split: str, index: int) -> np.random.Generator:
    """Each clip's own generator: the result does not depend on --jobs or on which classes are chosen."""
    return np.random.default_rng([seed, zlib.crc32(class_name.encode()), SPLIT_CODES[split], index])


def encode_vp9(frames: np.ndarray, path: Path, crf: int) -> None:
    """Encode RGB frames to VP9 WebM at 25 fps via a temp file + rename.

    In-process with PyAV (6x faster than spawning ffmpeg for clips this small), single-threaded so the
    bitstream is reproducible.
    """
    _, h, w, _ = frames.shape
    tmp = path.with_name(f".{path.name}.part")
    tmp.unlink(missing_ok=True)  # a leftover, or a link planted there: removing a link leaves its target
    try:
        # a new file (O_EXCL | O_NOFOLLOW) written through its descriptor: never through a link
        with os.fdopen(create_exclusive(tmp), "wb") as f, av.open(f, "w", format="webm") as container:
            stream = container.add_stream("libvpx-vp9", rate=25)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.codec_context.thread_count = 1
            stream.options = {"crf": str(crf), "b": "0", "deadline": "realtime", "cpu-used": "8",
                              "g": str(GOP), "keyint_min": str(GOP)}  # fmt: skip
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def make_clip(job: tuple[str, str, str, int, SynthOptions]) -> int:
    """Render + encode one clip unless it exists; return its decoded frame count."""
    out, class_name, split, index, opts = job
    path = Path(out)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        frames = render_clip(
            class_name, clip_rng(opts.seed, class_name, split, index), opts.size, opts.frames
        )
        encode_vp9(frames, path, opts.crf)
    try:
        return probe_video(path, count="decode").num_frames
    except ProbeError as e:
        raise RuntimeError(f"{path}: the clip just written does not decode ({e})") from None


def clip_name(split: str, index: int) -> str:
    return f"{split}_{index:04d}.webm"


def generate(out: Path, opts: SynthOptions, jobs: int, quiet: bool = False, replace: bool = False) -> bool:
    """Write the dataset to `out`; returns False when it was already complete (nothing done).

    `replace`: a set that prep.synth made with other options (an older demo recipe) is deleted first."""
    manifest = out / "synth.json"
    params = asdict(opts)
    params["classes"] = list(opts.classes)
    if manifest.is_file():
        try:
            previous = json.loads(manifest.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise UserError(f"{manifest} is not valid JSON: delete {out} and run again") from None
        if previous.get("params") != params and replace:
            print(f"{out}: made with other options ({manifest}); replacing it")
            shutil.rmtree(out)
            return generate(out, opts, jobs, quiet)
        if previous.get("params") != params:
            raise UserError(f"{out} holds a demo set made with other options ({manifest}); "
                            "choose another OUT or delete it first")  # fmt: skip
        if previous.get("complete") and all((out / f).is_file() for f in ("train.txt", "val.txt")):
            return False
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists, is not empty and was not made by prep.synth: choose another OUT")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(manifest, json.dumps({"params": params, "complete": False}, indent=1) + "\n")

    work = []
    for split, count in (("train", opts.per_class), ("val", opts.val_per_class)):
        for class_name in opts.classes:
            for index in range(count):
                path = out / "videos" / class_name / clip_name(split, index)
                work.append((str(path), class_name, split, index, opts))
    try:
        counts = {job[0]: n for job, n in parallel_map(make_clip, work, jobs, "synth clips", quiet=quiet)}
    except RuntimeError as e:  # an encoder failure names its clip; rerunning resumes after the fix
        raise UserError(str(e)) from None
    label = {name: i for i, name in enumerate(opts.classes)}
    lists: dict[str, list[str]] = {"train": [], "val": []}
    for path, class_name, split, _, _ in work:
        rel = Path(path).relative_to(out).as_posix()
        lists[split].append(f"{rel} {counts[path]} {label[class_name]}\n")
    for split, lines in lists.items():
        atomic_write_text(out / f"{split}.txt", "".join(lines))
    atomic_write_text(out / "classes.txt", "".join(f"{c}\n" for c in opts.classes))
    pairs = [f"{label[a]} {label[b]}\n" for a, b in FLIP_PAIRS if a in label and b in label]
    atomic_write_text(out / "flip_pairs.txt", "".join(pairs))
    atomic_write_text(manifest, json.dumps({"params": params, "complete": True}, indent=1) + "\n")
    return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m prep.synth", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)  # fmt: skip
    p.add_argument("out", type=Path, metavar="OUT", help="output folder (created)")
    p.add_argument("--classes", nargs="+", default=list(DEFAULT_CLASSES),
                   help=f"subset/order of: {' '.join(ALL_CLASSES)}")  # fmt: skip
    p.add_argument("--per-class", type=positive_int, default=512, help="training clips per class")
    p.add_argument("--val-per-class", type=positive_int, default=32, help="validation clips per class")
    # Defaults chosen by measurement (docs/TRAINING.md, "The demo"): a tiny model learns the motion
    # fastest from frames at the model's input size (no antialiased downscale blurring the edges) and
    # from 8-frame clips (8 TSN segments then take every frame, so speeds stay consistent).
    p.add_argument("--size", type=int, default=32, help="frame side in pixels (square, even, >= 32)")
    p.add_argument("--frames", type=int, default=8, help="frames per clip (>= 8), at 25 fps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crf", type=int, default=30, help="VP9 quality (lower = better, bigger)")
    p.add_argument("--jobs", type=positive_int, default=default_jobs(), help="parallel clip writers")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--replace", action="store_true",
                   help="OUT holds a set made with other options: delete it, build this one")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = [c for c in args.classes if c not in ALL_CLASSES]
    if unknown:
        raise UserError(f"--classes: unknown {' '.join(unknown)}; choose from {' '.join(ALL_CLASSES)}")
    if len(set(args.classes)) != len(args.classes):
        raise UserError("--classes: a class is named twice")
    if args.size < 32 or args.size % 2:
        raise UserError(f"--size must be even and >= 32, got {args.size}")
    if args.frames < 8:
        raise UserError(f"--frames must be >= 8, got {args.frames}")
    if not 0 <= args.crf <= 63:
        raise UserError(f"--crf must be in 0..63, got {args.crf}")
    opts = SynthOptions(tuple(args.classes), args.per_class, args.val_per_class, args.size, args.frames,
                        args.seed, args.crf)  # fmt: skip
    if generate(args.out, opts, args.jobs, args.quiet, args.replace):
        n = len(opts.classes) * (opts.per_class + opts.val_per_class)
        print(f"{args.out}: {n} clips of {len(opts.classes)} classes; lists train.txt, val.txt")
    else:
        print(f"{args.out}: already complete (same options); nothing to do")
    return 0


if __name__ == "__main__":
    run_cli(main)
