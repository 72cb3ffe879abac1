"""Test-decode every entry of a list file; write the bad ones with a reason and a cleaned list.

    python -m prep.validate LIST [--root DIR] [--device cpu|gpu] [--cpu-decoder pyav|dali] [--jobs N]

Writes LIST.bad (tab-separated `entry<TAB>kind<TAB>line N: detail`, one line per problem; malformed
lines appear as `LIST:LINE<TAB>malformed line<TAB>detail`) and the cleaned list next to LIST with
`.clean` before the extension (train.txt -> train.clean.txt), with its packet index beside it
(train.clean.txt.index, see dali_pipes/packet_index.py). The input list is never modified.
A check of another loader route names its outputs after the route, so it never replaces the clean list
of the default route (which a config may name): --device gpu -> train.gpu.clean.txt and
train.txt.gpu.bad, --cpu-decoder dali -> train.dali.clean.txt and train.txt.dali.bad.
Exit status: 0 when every entry is good, 1 when bad entries were found (both files are written either
way), 2 for a usage error.

Kinds: missing, empty, truncated, undecodable, no video stream, zero frames, frame count differs,
unsupported codec, rotated, variable frame rate, no timestamps, size changes, malformed line,
duplicate line. List lines are parsed by
dali_pipes.listfile, the loader's parser (one rule for comments, BOM, CRLF, fields and duplicates).
Every image of a frame folder is test-decoded. An empty list is a usage error (exit status 2).

Decoding is always a real full decode with FFmpeg's software decoders (PyAV). --device and
--cpu-decoder mirror data.device / data.cpu_decoder in the config and only decide which codecs the
loader's decoder can take: gpu = NVDEC through DALI (8-bit 4:2:0 only), cpu + pyav = anything FFmpeg decodes,
cpu + dali = DALI's CPU video decoder (VP8, VP9, MJPEG only).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import av
from PIL import Image

from dali_pipes.listfile import DUPLICATE, MALFORMED, Entry, ListFileError, parse_list
from engine.config import DefaultsHelpFormatter
from prep.common import (
    IMAGE_EXTENSIONS,
    RAW_EXTENSIONS,
    VIDEO_EXTENSIONS,
    UserError,
    atomic_write_text,
    default_jobs,
    parallel_map,
    positive_int,
    run_cli,
    write_packet_index,
)
from prep.probe import EMPTY, RAW_FORMATS, TRUNCATED, UNDECODABLE, ProbeError, probe_video

ZERO_FRAMES = "zero frames"
COUNT_DIFFERS = "frame count differs"
UNSUPPORTED = "unsupported codec"
VARIABLE_FPS = "variable frame rate"
ROTATED = "rotated"
NO_TIMESTAMPS = "no timestamps"
SIZE_CHANGES = "size changes"
JPEG_MAGIC, PNG_MAGIC = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"

# Codecs each loader route can decode (codec names: probe reports av1 for a file libdav1d decodes).
GPU_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mjpeg"})  # NVDEC via DALI
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})  # DALI's CPU video decoder
# NVDEC through DALI decodes 8-bit 4:2:0 only: 10-bit, 4:2:2 and 4:4:4 H.264 have no NVDEC profile at all,
# and DALI's GPU video decoder converts 8-bit NV12 surfaces. Refused on --device gpu for every codec.
NVDEC_PIX_FMTS = frozenset({"yuv420p", "yuvj420p", "nv12"})


def allowed_codecs(device: str, cpu_decoder: str) -> frozenset[str] | None:
    """Codecs the chosen loader route decodes; None = whatever FFmpeg decodes (checked by decoding)."""
    if device == "gpu":
        return GPU_CODECS
    return DALI_CPU_CODECS if cpu_decoder == "dali" else None


def allowed_pixel_formats(device: str) -> frozenset[str] | None:
    """Pixel formats the chosen loader route decodes; None = any (the CPU routes convert everything)."""
    return NVDEC_PIX_FMTS if device == "gpu" else None


def check_video(
    path: Path, listed: int, codecs: frozenset[str] | None, route: str, pix_fmts: frozenset[str] | None = None
) -> list[tuple[str, str]]:
    """All (kind, detail) problems of one video file; [] when it is good."""
    try:
        info = probe_video(path, count="header")
    except ProbeError as e:
        return [(e.kind, e.detail)]
    if info.container in RAW_FORMATS:  # whatever the name says (an Annex-B stream named .mp4)
        why = ("no container, so its frames carry no timestamps and the loader cannot seek in it; "
               "re-encode with prep.resize --fps N (N: the rate it was recorded at)")  # fmt: skip
        return [(NO_TIMESTAMPS, f"a raw {info.codec} elementary stream: {why}")]
    if codecs is not None and info.codec not in codecs:
        return [
            (UNSUPPORTED, f"{info.codec} cannot be decoded by {route} (it takes {', '.join(sorted(codecs))})")
        ]
    # A header without a pixel format (a cut file) is judged by decoding first: truncated, not "unknown".
    if info.pix_fmt and pix_fmt_refused(info.codec, info.pix_fmt, pix_fmts, route):
        return [pix_fmt_refused(info.codec, info.pix_fmt, pix_fmts, route)]
    try:
        info = probe_video(path, count="decode")
    except ProbeError as e:
        return [(e.kind, e.detail)]
    n, declared = info.num_frames, info.declared_frames
    # Fewer frames than the header promises = cut short (not judged for VFR files: their
    # duration x average rate estimate is unreliable, and they are reported anyway).
    short = declared > 0 and n < declared - max(2, 0.05 * declared) and not info.variable_fps
    # A decoder error means damaged data (corruption); a stream that just ends early means a cut file.
    if info.decode_error:
        cut = " (damaged, or cut short)" if n < declared else ""
        why = f"decoding failed after {n} of {declared or '?'} frames{cut}: {info.decode_error}"
        return [(UNDECODABLE, why)]
    if n == 0:
        return [(ZERO_FRAMES, "the video stream delivers no frames")]
    if short and not info.pix_fmt:
        return [(TRUNCATED, f"{n} frames decode but the container declares {declared}")]
    if pix_fmt_refused(info.codec, info.pix_fmt, pix_fmts, route):
        return [pix_fmt_refused(info.codec, info.pix_fmt, pix_fmts, route)]
    problems = []
    if len(info.sizes) > 1:
        sizes = " then ".join(f"{w}x{h}" for w, h in info.sizes[:3])
        problems.append((SIZE_CHANGES, f"the frame size changes midway ({sizes}): a clip cannot mix sizes; "
                                       "re-encode with prep.resize (one size)"))  # fmt: skip
    if short:
        problems.append((TRUNCATED, f"{n} frames decode but the container declares {declared}"))
    if n != listed:
        problems.append((COUNT_DIFFERS, f"list says {listed}, decoder delivers {n}"))
    if info.rotation:
        why = "the loader refuses rotated files (it does not rotate); re-encode with prep.resize, which does"
        problems.append((ROTATED, f"display rotation {info.rotation} degrees: {why}"))
    if info.variable_fps:
        problems.append((VARIABLE_FPS, f"frame timestamps are unevenly spaced (average {info.fps:.3f} fps); "
                                       "re-encode with prep.resize"))  # fmt: skip
    return problems


def pix_fmt_refused(codec: str, pix_fmt: str, pix_fmts: frozenset[str] | None, route: str) -> tuple | None:
    """(UNSUPPORTED, why) when the route cannot decode this pixel format, else None."""
    if pix_fmts is None or pix_fmt in pix_fmts:
        return None
    why = "takes 8-bit 4:2:0 only (no 10-bit, 4:2:2 or 4:4:4); re-encode with prep.resize (yuv420p)"
    return UNSUPPORTED, f"{codec} {pix_fmt or 'unknown pixel format'}: {route} {why}"


def check_image(image: Path) -> tuple[str, str] | None:
    """(kind, why) when one frame image is unusable, else None.

    The content must match the extension (the loader hands .jpg files to a JPEG decoder), PIL must
    load the whole image (catches truncated files and headers without image data) and FFmpeg's
    decoder with error detection on ("explode") must accept it (catches damaged entropy-coded data,
    which PIL / libjpeg decode into garbage with only a warning).
    """
    with open(image, "rb") as f:
        head = f.read(8)
    if not head:
        return EMPTY, f"{image.name} has 0 bytes"
    suffix = image.suffix.lower()
    if suffix in (".jpg", ".jpeg") and not head.startswith(JPEG_MAGIC):
        found = "a PNG" if head.startswith(PNG_MAGIC) else "not a JPEG"
        return UNDECODABLE, f"{image.name} is {found} (the loader decodes {suffix} frames as JPEG)"
    if suffix == ".png" and not head.startswith(PNG_MAGIC):
        return UNDECODABLE, f"{image.name} is not a PNG"
    try:
        with Image.open(image) as im:
            im.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        kind = TRUNCATED if "truncated" in str(e) else UNDECODABLE
        return kind, f"{image.name}: {e}"
    try:
        with av.open(str(image)) as c:
            stream = c.streams.video[0]
            stream.codec_context.options = {"err_detect": "explode"}
            if not list(c.decode(stream)):
                return UNDECODABLE, f"{image.name}: the decoder returns no image"
    except (av.FFmpegError, OSError, IndexError) as e:
        return UNDECODABLE, f"{image.name}: damaged image data ({getattr(e, 'strerror', None) or e})"
    return None


def check_frame_folder(folder: Path, listed: int, template: str, start: int) -> list[tuple[str, str]]:
    """A frame folder is good when frames start..start+n-1 exist by the template and each decodes.

    Every image is test-decoded (check_image); one problem line per kind names the count and the first.
    """
    images = [
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    ]
    if not images:
        return [(ZERO_FRAMES, "the frame folder holds no images")]
    problems = []
    expected = [folder / template.format(i) for i in range(start, start + len(images))]
    gaps = [p.name for p in expected if not p.is_file()]
    if gaps:
        problems.append((TRUNCATED, f"{len(gaps)} frames missing from the numbering, first {gaps[0]} "
                                    f"(template {template} from {start})"))  # fmt: skip
    if len(images) != listed:
        problems.append((COUNT_DIFFERS, f"list says {listed}, the folder holds {len(images)} images"))
    bad: dict[str, list[str]] = {}
    for image in sorted(images):
        found = check_image(image)
        if found:
            bad.setdefault(found[0], []).append(found[1])
    for kind, details in bad.items():
        problems.append((kind, f"{len(details)} of {len(images)} images unusable, first {details[0]}"))
    return problems


def check_entry(job: tuple) -> list[tuple[str, str]]:
    """(path, listed frames, codecs, route, frame template, frame start, pixel formats) -> problems."""
    path_text, listed, codecs, route, template, start, pix_fmts = job
    path = Path(path_text)
    try:
        if path.is_dir() and path.suffix.lower() in VIDEO_EXTENSIONS + RAW_EXTENSIONS:
            return [(UNDECODABLE, "is a directory, not a video file")]
        if path.is_dir():
            return check_frame_folder(path, listed, template, start)
        return check_video(path, listed, codecs, route, pix_fmts)
    except Exception as e:  # one odd file must not end a run over a whole dataset: report it
        return [(UNDECODABLE, f"unexpected {type(e).__name__} while reading: {e}")]


def route_tag(device: str, cpu_decoder: str) -> str:
    """'' for the default route (cpu + pyav), else the route's name in the output names: gpu | dali."""
    return "gpu" if device == "gpu" else ("dali" if cpu_decoder == "dali" else "")


def clean_list_path(list_path: Path, tag: str = "") -> Path:
    """train.txt -> train.clean.txt (LIST.clean without an extension); a route check: train.gpu.clean.txt."""
    clean = f"{tag}.clean" if tag else "clean"
    if list_path.suffix:
        return list_path.with_name(f"{list_path.stem}.{clean}{list_path.suffix}")
    return list_path.with_name(f"{list_path.name}.{clean}")


def bad_list_path(list_path: Path, tag: str = "") -> Path:
    """LIST.bad; a route check: LIST.gpu.bad / LIST.dali.bad."""
    return Path(f"{list_path}.{tag}.bad" if tag else f"{list_path}.bad")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter,
        prog="python -m prep.validate",
        description="Test-decode every entry of a list; write LIST.bad and a cleaned list.",
    )
    p.add_argument("list", type=Path, metavar="LIST", help="list file: 'path num_frames label' per line")
    p.add_argument(
        "--root", type=Path, default=None, help="folder the list paths are relative to (default: LIST's)"
    )
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="the loader's data.device")
    p.add_argument("--cpu-decoder", choices=("pyav", "dali"), default="pyav",
                   help="the loader's data.cpu_decoder (dali: VP8/VP9/MJPEG only)")  # fmt: skip
    p.add_argument("--frame-template", default="{:05d}.jpg", help="frame folders: file name of frame i")
    p.add_argument("--frame-start", type=int, default=1, help="frame folders: number of the first frame")
    p.add_argument("--jobs", type=positive_int, default=default_jobs(), help="parallel decoders")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    list_path: Path = args.list
    if not list_path.is_file():
        raise UserError(f"{list_path}: list file not found")
    root = args.root if args.root is not None else list_path.parent
    if not root.is_dir():
        raise UserError(f"--root {root} is not a folder")
    try:
        args.frame_template.format(1)
    except (IndexError, KeyError, ValueError):
        raise UserError(
            f"--frame-template {args.frame_template!r} must format one integer, e.g. {{:05d}}.jpg"
        ) from None
    classes_file = list_path.parent / "classes.txt"
    num_classes = None
    if classes_file.is_file():
        num_classes = sum(1 for line in classes_file.read_text(encoding="utf-8").splitlines() if line.strip())

    try:
        entries, line_problems = parse_list(list_path, root, num_classes)
    except ListFileError as e:
        raise UserError(str(e)) from None
    if not entries and not line_problems:
        raise UserError(f"{list_path}: the list has no samples (empty, or only blank and comment lines)")
    problems = [(p.where, p.kind, p.reason) for p in line_problems]
    codecs = allowed_codecs(args.device, args.cpu_decoder)
    pix_fmts = allowed_pixel_formats(args.device)
    route = "the GPU decoder (NVDEC)" if args.device == "gpu" else f"the CPU {args.cpu_decoder} decoder"
    jobs: dict[tuple, list[Entry]] = {}
    for e in entries:
        key = (e.path, e.num_frames, codecs, route, args.frame_template, args.frame_start, pix_fmts)
        jobs.setdefault(key, []).append(e)
    found: dict[int, list[tuple[str, str]]] = {}
    for job, result in parallel_map(check_entry, list(jobs), args.jobs, "validate", quiet=args.quiet):
        for e in jobs[job]:
            if result:
                found[e.line] = result
    by_line = {e.line: e for e in entries}
    for line_no in sorted(found):
        problems += [
            (by_line[line_no].rel, kind, f"line {line_no}: {detail}") for kind, detail in found[line_no]
        ]
    bad_lines = set(found)

    tag = route_tag(args.device, args.cpu_decoder)
    bad_path, clean_path = bad_list_path(list_path, tag), clean_list_path(list_path, tag)
    atomic_write_text(bad_path, "".join(f"{where}\t{kind}\t{' '.join(detail.split())}\n"
                                        for where, kind, detail in problems))  # fmt: skip
    atomic_write_text(clean_path, "".join(f"{e.text}\n" for e in entries if e.line not in bad_lines))
    good_videos = [e.path for e in entries if e.line not in bad_lines]
    if any(Path(p).is_file() for p in good_videos):  # the loader memory-maps CLEAN.index (packet_index)
        write_packet_index(clean_path, good_videos, args.jobs, args.quiet)
    kinds = Counter(kind for _, kind, _ in problems)
    good = len(entries) - len(bad_lines)
    if not problems:
        print(f"{list_path}: all {good} entries good")
        return 0
    summary = ", ".join(f"{kind}: {n}" for kind, n in kinds.most_common())
    lines = kinds[MALFORMED] + kinds[DUPLICATE]
    print(f"{list_path}: {good} good, {len(bad_lines)} bad entries, {lines} malformed or duplicate lines "
          f"({summary}); see {bad_path}; clean list: {clean_path}")  # fmt: skip
    return 1


if __name__ == "__main__":
    run_cli(main)
