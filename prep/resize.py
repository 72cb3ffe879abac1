"""Re-encode a video tree for fast random access: short side, constant frame rate, fixed GOP, one codec.

    python -m prep.resize SRC DST --short-side 320 --codec h264 --gop 16 --fps keep --jobs 8 [--shard 1/4]

Why: DALI (and any seeking decoder) pays for every frame between the previous keyframe and the one it
wants, so outputs get a keyframe exactly every `gop` frames (scene-cut keyframes off, closed GOPs, IDR
keyframes for H.264), a constant frame rate (frame i sits at i / fps) and yuv420p, video stream only.
Sub-folders are kept; DST/<rel>.<ext> where ext follows the codec (h264 .mp4, vp9 .webm, mjpeg .avi).
Each output is written to a hidden temp file and renamed when ffmpeg succeeded, so an interrupted run is
resumed by running the same command again: finished outputs are skipped, leftover temp files redone.
Sources are only read: an output or temp path under DST that passes through a symbolic link or resolves
into SRC is refused before anything is written, and temp files are created with O_EXCL | O_NOFOLLOW. Raw
H.264/HEVC elementary streams (.h264 .264 .avc .h265 .265 .hevc) are picked up too; they state no frame
rate, so they need --fps N (else they are reported). Failures do not stop the run; they are collected
in DST/resize-report*.tsv; Ctrl-C exits 130 and blames no source.
DST/resize-options.json records the options the outputs were made with: a rerun with other options
(a new --short-side, codec, gop, fps, crf or preset) is refused naming them, instead of keeping old
outputs that do not match; `--force` re-encodes every output with the new options.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import ffmpeg

from engine.config import DefaultsHelpFormatter
from prep.common import (
    RAW_EXTENSIONS,
    VIDEO_EXTENSIONS,
    UserError,
    atomic_write_text,
    create_exclusive,
    default_jobs,
    parallel_map,
    positive_int,
    refuse_links_and_sources,
    run_cli,
)
from prep.probe import RAW_FORMATS, ProbeError, VideoInfo, probe_video

EXTENSIONS = {"h264": ".mp4", "vp9": ".webm", "mjpeg": ".avi"}
CONTAINERS = {"h264": "mp4", "vp9": "webm", "mjpeg": "avi"}
DEFAULT_CRF = {"h264": 23, "vp9": 32, "mjpeg": 3}  # mjpeg: the -q:v scale (2 best .. 31 worst)
CRF_RANGE = {"h264": (0, 51), "vp9": (0, 63), "mjpeg": (2, 31)}
X264_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
)


@dataclass(frozen=True)
class Options:
    short_side: int
    codec: str
    gop: int
    fps: str  # "keep" or a positive number
    crf: int
    preset: str
    threads: int  # ffmpeg threads per job


@dataclass(frozen=True)
class Job:
    src: Path
    out: Path
    rel: str  # source path relative to SRC, for messages and the report


def output_path(rel: Path, dst: Path, codec: str) -> Path:
    """DST/<rel without extension>.<codec extension>."""
    return dst / rel.with_suffix(EXTENSIONS[codec])


def temp_path(out: Path) -> Path:
    """Hidden, deterministic temp name next to the output: a rerun overwrites a leftover one."""
    return out.with_name(f".{out.name}.part")


def in_shard(rel: str, shard: tuple[int, int]) -> bool:
    """Shard K of N (K from 1) by a hash of the relative path: stable whatever each machine lists."""
    k, n = shard
    return int.from_bytes(hashlib.sha1(rel.encode()).digest()[:8], "big") % n == k - 1


def find_sources(src: Path) -> list[Path]:
    """Video files (and raw elementary streams) under SRC by extension, hidden files and folders skipped,
    sorted."""
    found = []
    extensions = VIDEO_EXTENSIONS + RAW_EXTENSIONS
    for folder, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(folder) / f for f in sorted(files)
                  if not f.startswith(".") and Path(f).suffix.lower() in extensions]  # fmt: skip
    return found


def ffmpeg_command(src: Path, tmp: Path | str, rate: str, opts: Options, raw: bool = False) -> list[str]:
    """The ffmpeg command line (built with ffmpeg-python) for one file; `raw`: an elementary stream,
    whose frames are read at `rate` (it has no timestamps of its own)."""
    s = opts.short_side
    # Scale the displayed frame (width x sample aspect) so the short side is exactly `s` and the long
    # side is even (yuv420p needs even sizes); then mark pixels square. ffmpeg autorotates before this.
    portrait = "lte(iw*sar,ih)"
    width = f"if({portrait},{s},2*round({s}*iw*sar/ih/2))"
    height = f"if({portrait},2*round({s}*ih/(iw*sar)/2),{s})"
    rate_in = {"framerate": rate} if raw else {}
    video = ffmpeg.input(str(src), threads=opts.threads, **rate_in).video
    video = video.filter("fps", fps=rate).filter("scale", w=width, h=height).filter("setsar", 1)
    g = opts.gop
    if opts.codec == "h264":
        codec_args = {
            "c:v": "libx264", "preset": opts.preset, "crf": opts.crf, "pix_fmt": "yuv420p",
            "x264-params": f"keyint={g}:min-keyint={g}:scenecut=0:open-gop=0",
            "forced-idr": 1, "movflags": "+faststart",
        }  # fmt: skip
    elif opts.codec == "vp9":
        codec_args = {
            "c:v": "libvpx-vp9", "b:v": 0, "crf": opts.crf, "deadline": "good", "cpu-used": 4,
            "row-mt": 1, "g": g, "keyint_min": g, "pix_fmt": "yuv420p",
        }  # fmt: skip
    else:  # mjpeg: every frame is a keyframe; full-range 4:2:0 is what the JPEG encoder writes
        codec_args = {"c:v": "mjpeg", "q:v": opts.crf, "pix_fmt": "yuvj420p"}
    out = ffmpeg.output(
        video, str(tmp), f=CONTAINERS[opts.codec], an=None, sn=None, dn=None,
        map_metadata=-1, map_chapters=-1, threads=opts.threads, **codec_args,
    )  # fmt: skip
    cmd = out.compile()
    # -xerror: stop at the first decode error instead of encoding around damaged or missing data
    return ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-xerror", "-y", *cmd[1:]]


def _last_lines(text: str, limit: int = 300) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-3:])[-limit:] or "no message"


def shorter_than_source(source_seconds: float, frames: int, rate: str) -> str:
    """'' or why an output of `frames` frames at `rate` fps is cut short against the source's duration.

    A source cut short (an interrupted download) often decodes without an error: the demuxer just
    ends early. Its header still states the whole duration, which the output must cover
    (5 % or 0.1 s of slack for rounding).
    """
    fps = float(Fraction(rate))
    if source_seconds <= 0 or fps <= 0:
        return ""
    got = frames / fps
    if got < 0.95 * source_seconds - 0.1:
        return f"truncated source: its header states {source_seconds:.2f} s, only {got:.2f} s decode"
    return ""


def _packet_count(path: Path) -> int | None:
    try:
        return probe_video(path, count="packets").num_frames
    except ProbeError:
        return None


def source_rate(source: VideoInfo, opts: Options) -> str:
    """The frame rate to encode at: --fps, else the source's; "" when it has none to keep (raw streams
    have no container to state one: ffmpeg's 25 fps would be a guess)."""
    if opts.fps != "keep":
        return opts.fps
    if source.container in RAW_FORMATS:
        return ""
    return f"{source.rate.numerator}/{source.rate.denominator}" if source.rate is not None else ""


INTERRUPTED = "interrupted"  # convert's status when ffmpeg was stopped by Ctrl-C / SIGTERM, not by its input


def convert(job: Job, opts: Options) -> tuple[str, str]:
    """Encode one file; returns ("done", ""), ("failed", reason) or (INTERRUPTED, ""). Never raises for a
    bad file.

    Decode errors are failures: ffmpeg runs with -xerror and any message it prints at level
    `error` fails the file (ffmpeg exits 0 after encoding around damaged data otherwise). ffmpeg stopped
    by a signal (Ctrl-C reaches the whole process group) is not the source's fault: INTERRUPTED.
    """
    try:
        source = probe_video(job.src, count="header")  # a clear reason for unreadable files
    except ProbeError as e:
        return "failed", str(e)
    raw = source.container in RAW_FORMATS
    rate = source_rate(source, opts)
    if not rate:
        if raw:
            return "failed", (f"raw {source.codec} elementary stream (no container): it states no reliable "
                              "frame rate; pass --fps N, the rate it was recorded at")
        return "failed", "the source does not state its frame rate; pass --fps N"
    tmp = temp_path(job.out)
    job.out.parent.mkdir(parents=True, exist_ok=True)
    if tmp.is_symlink():  # planted after main's check: never write through it
        return "failed", f"{tmp} is a symbolic link: remove it"
    tmp.unlink(missing_ok=True)  # a leftover of an interrupted run
    try:
        fd = create_exclusive(tmp)
    except OSError as e:
        return "failed", f"cannot create the temp file {tmp}: {e.strerror}"
    try:
        # ffmpeg writes through the descriptor opened here, not by name: nothing swapped in can redirect it
        cmd = ffmpeg_command(job.src, f"/dev/fd/{fd}", rate, opts, raw)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, pass_fds=(fd,))
        finally:
            os.close(fd)
        # ffmpeg exits 255 after a SIGINT/SIGTERM it caught (silently at -v error; 255 with an error message
        # is AVERROR(EPERM), a real failure); a negative status is a signal it did not catch
        caught = proc.returncode == 255 and not proc.stderr.strip()
        if caught or proc.returncode in (-signal.SIGINT, -signal.SIGTERM):
            return INTERRUPTED, ""
        if proc.returncode < 0:
            return "failed", (f"ffmpeg was killed by signal {-proc.returncode} (out of memory?), not a fault "
                              "of the source known so far: rerun to retry")
        if proc.returncode != 0:
            if _packet_count(job.src) == 0:  # ffmpeg's own words are cryptic here
                return "failed", "zero frames: the source's video stream has no frames"
            why = "it stops at the first decode error: a damaged or cut source?"
            return "failed", f"ffmpeg exit status {proc.returncode} ({why}): {_last_lines(proc.stderr)}"
        if proc.stderr.strip():
            return "failed", f"decode errors (damaged or cut source): {_last_lines(proc.stderr)}"
        try:
            info = probe_video(tmp, count="packets")
        except ProbeError as e:
            return "failed", f"ffmpeg wrote an unusable file: {e}"
        if info.num_frames == 0:
            return "failed", "ffmpeg wrote no frames (is the source video stream empty?)"
        short = shorter_than_source(source.duration, info.num_frames, rate)
        if short:
            return "failed", short
        os.replace(tmp, job.out)
        return "done", ""
    finally:
        tmp.unlink(missing_ok=True)


def _convert_star(args: tuple[Job, Options]) -> tuple[str, str]:
    return convert(*args)


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 1, 1
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard must look like K/N (e.g. 2/4), got {text!r}") from None
    if not (n >= 1 and 1 <= k <= n):
        raise UserError(f"--shard K/N needs 1 <= K <= N, got {text!r}")
    return k, n


def check_outputs(src: Path, dst: Path, outputs: list[Path]) -> None:
    """Refuse (UserError) before anything is written when an output, its temp file or DST's own files
    pass through a symbolic link or resolve into SRC (a link in DST must never let a write reach SRC)."""
    fixed = [dst / OPTIONS_FILE, dst / "resize-report.tsv"]
    for path in fixed + [p for out in outputs for p in (out, temp_path(out))]:
        refuse_links_and_sources(path, dst, src, "prep.resize")


def check_folders(src: Path, dst: Path) -> None:
    """Sources are never touched: refuse a DST that is SRC, inside it, or contains it."""
    if not src.is_dir():
        raise UserError(f"SRC {src} is not a folder")
    s, d = src.resolve(), dst.resolve()
    if d == s:
        raise UserError(f"DST {dst} is the same folder as SRC: outputs would mix with the sources")
    if s in d.parents:
        raise UserError(f"DST {dst} is inside SRC {src}: a rerun would treat outputs as sources")
    if d in s.parents:
        raise UserError(f"SRC {src} is inside DST {dst}: outputs could land among the sources")


OPTIONS_FILE = "resize-options.json"
RECORDED = ("short_side", "codec", "gop", "fps", "crf", "preset")  # what changes the outputs (not threads)


def recorded_options(opts: Options) -> dict:
    return {key: getattr(opts, key) for key in RECORDED}


def prepare_options(dst: Path, opts: Options, force: bool) -> float:
    """Check DST's options record against this run's; returns the time before which outputs are stale.

    Outputs count as finished only when newer than the record (the same filesystem clock), so after a
    --force (which rewrites the record) every older output is re-encoded, also by other --shard jobs and
    by a rerun after an interruption. A record with other options, or outputs without any record (an
    older prep.resize), is refused unless --force.
    """
    sidecar = dst / OPTIONS_FILE
    wanted = recorded_options(opts)
    old = read_options(sidecar)
    if not force:
        if old is not None and old != wanted:
            diffs = [f"--{k.replace('_', '-')} {old.get(k)} (now {wanted[k]})" for k in RECORDED
                     if old.get(k) != wanted[k]]  # fmt: skip
            raise UserError(
                f"{dst} holds outputs made with {', '.join(diffs)} ({sidecar}): pass --force to re-encode "
                "them with the new options (sources are never touched), or choose another DST"
            )
        if old is None and dst.is_dir() and find_sources(dst):
            raise UserError(
                f"{dst} holds videos but no {OPTIONS_FILE} saying how they were made: pass --force to "
                "re-encode them with these options, or choose another DST"
            )
    if force or old is None:
        atomic_write_text(sidecar, json.dumps(wanted, indent=1) + "\n")
    return sidecar.stat().st_mtime


def read_options(sidecar: Path) -> dict | None:
    if not sidecar.is_file():
        return None
    try:
        return json.loads(sidecar.read_text())
    except ValueError as e:
        raise UserError(f"{sidecar}: not valid JSON ({e}); --force re-encodes and rewrites it") from None


def read_only_list(path: Path, src: Path) -> set[Path]:
    """The resolved paths --only names; a line naming no video under SRC is an error naming the line."""
    if not path.is_file():
        raise UserError(f"--only {path}: file not found")
    wanted: set[Path] = set()
    root = src.resolve()
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        p = (src / line).resolve()  # an absolute line stays as it is
        if not p.is_file() or not p.is_relative_to(root):
            raise UserError(f"{path}:{lineno}: {line} is not a video under {src}")
        wanted.add(p)
    return wanted


def report_path(dst: Path, shard: tuple[int, int]) -> Path:
    k, n = shard
    return dst / ("resize-report.tsv" if n == 1 else f"resize-report.shard-{k}-of-{n}.tsv")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter,
        prog="python -m prep.resize",
        description="Re-encode every video under SRC into DST (same sub-folders) with a given short side, "
        "constant frame rate and a keyframe every --gop frames. Resumable: rerun the same command.",
    )
    p.add_argument("src", type=Path, metavar="SRC", help="folder of source videos (only read)")
    p.add_argument("dst", type=Path, metavar="DST", help="output folder (must not be inside SRC)")
    p.add_argument("--short-side", type=positive_int, default=320, help="output short side in pixels (even)")
    p.add_argument("--codec", choices=sorted(EXTENSIONS), default="h264",
                   help="h264 -> .mp4, vp9 -> .webm, mjpeg -> .avi (every frame a keyframe)")  # fmt: skip
    p.add_argument("--gop", type=positive_int, default=16, help="frames between keyframes (fixed)")
    p.add_argument("--fps", default="keep", help="'keep' (the source's average rate, made constant) or N")
    p.add_argument("--crf", type=int, default=None,
                   help="quality: h264 CRF (default 23), vp9 CRF (32), mjpeg q:v 2..31 (3)")  # fmt: skip
    p.add_argument("--preset", default="veryfast", choices=X264_PRESETS, help="x264 preset (h264 only)")
    p.add_argument("--jobs", type=positive_int, default=default_jobs(), help="parallel ffmpeg processes")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="only shard K of N (K from 1): N machines split one dataset")  # fmt: skip
    p.add_argument("--only", metavar="LIST", type=Path,
                   help="re-encode only the videos this file names, one path a line (absolute or relative to "
                        "SRC), e.g. prep.audit's --expensive-list")  # fmt: skip
    p.add_argument("--force", action="store_true",
                   help=f"re-encode existing outputs (needed when DST/{OPTIONS_FILE} records other options)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.short_side % 2:
        raise UserError(f"--short-side must be even (yuv420p needs even sizes), got {args.short_side}")
    if args.fps != "keep":
        try:
            if float(args.fps) <= 0:
                raise ValueError
        except ValueError:
            raise UserError(f"--fps must be 'keep' or a positive number, got {args.fps!r}") from None
    shard = parse_shard(args.shard)
    check_folders(args.src, args.dst)
    crf = DEFAULT_CRF[args.codec] if args.crf is None else args.crf
    low, high = CRF_RANGE[args.codec]
    if not low <= crf <= high:
        raise UserError(f"--crf for {args.codec} must be in {low}..{high}, got {crf}")
    threads = max(1, default_jobs() // args.jobs)
    opts = Options(args.short_side, args.codec, args.gop, args.fps, crf, args.preset, threads)
    only = read_only_list(args.only, args.src) if args.only else None
    sources = [s for s in find_sources(args.src)  # a.mp4 and a.webm: same shard, same output
               if in_shard(s.relative_to(args.src).with_suffix("").as_posix(), shard)
               and (only is None or s.resolve() in only)]  # fmt: skip
    outputs = [output_path(s.relative_to(args.src), args.dst, args.codec) for s in sources]
    check_outputs(args.src, args.dst, outputs)
    stale_before = prepare_options(args.dst, opts, args.force)

    failures: list[tuple[str, str]] = []
    jobs: list[Job] = []
    claimed: dict[Path, str] = {}
    skipped = 0
    for src, out in zip(sources, outputs, strict=True):
        rel = src.relative_to(args.src)
        if out in claimed:
            failures.append((rel.as_posix(), f"same output {out} as {claimed[out]}: rename one of them"))
            continue
        claimed[out] = rel.as_posix()
        if out.exists() and out.stat().st_mtime >= stale_before:
            skipped += 1
            continue
        jobs.append(Job(src, out, rel.as_posix()))

    args.dst.mkdir(parents=True, exist_ok=True)
    report = report_path(args.dst, shard)
    done = 0
    try:
        work = [(job, opts) for job in jobs]
        for (job, _), (status, reason) in parallel_map(
            _convert_star, work, args.jobs, f"resize {args.codec}", threads=True, quiet=args.quiet
        ):
            if status == INTERRUPTED:  # the Ctrl-C reached ffmpeg first: stop as Python's own Ctrl-C does
                raise KeyboardInterrupt
            if status == "done":
                done += 1
            else:
                failures.append((job.rel, reason))
    finally:
        lines = [f"{rel}\t{' '.join(reason.split())}\n" for rel, reason in sorted(failures)]
        atomic_write_text(report, "".join(lines))
    print(f"{done} encoded, {skipped} already finished (skipped), {len(failures)} failed"
          + (f": see {report}" if failures else ""))  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    run_cli(main)
