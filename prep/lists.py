"""Build list files (`relative/path num_frames label` per line) and classes.txt from official annotations.

    python -m prep.lists kinetics --csv train.csv validate.csv --videos DIR --out DIR
    python -m prep.lists sthv2 --annotations DIR --videos DIR --out DIR
    python -m prep.lists sthv1 --annotations DIR --frames DIR --out DIR
    python -m prep.lists folders --root DIR --out DIR [--splits train val | --val-fraction 0.2]

num_frames is what a decoder really delivers (decoded frames, or packets with --count packets), never the
container's estimate; for frame folders it is the number of images. Paths are written relative to --out
(the list's own folder), which is what dali_pipes uses when data.root is empty. Entries whose file is
missing or unreadable are left out and listed in OUT/lists-report.tsv; for Kinetics, the CSV rows with
no video are also written to OUT/missing.csv (same columns, ready to feed a downloader). Beside each
list of videos goes its packet index, SPLIT.txt.index (dali_pipes/packet_index.py): no loader demuxes.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import io
import json
import os
import random
import re
import stat
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from dali_pipes.listfile import file_identity, format_line
from engine.config import DefaultsHelpFormatter
from prep.common import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    UserError,
    atomic_write_text,
    default_jobs,
    parallel_map,
    positive_int,
    run_cli,
    write_packet_index,
)
from prep.probe import ProbeError, count_images, probe_video

SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")
KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end", "split")
STHV2_FILES = {"labels": "something-something-v2-labels.json", "train": "something-something-v2-train.json",
               "val": "something-something-v2-validation.json"}  # fmt: skip
STHV1_FILES = {"labels": "something-something-v1-labels.csv", "train": "something-something-v1-train.csv",
               "val": "something-something-v1-validation.csv"}  # fmt: skip


@dataclass(frozen=True)
class Sample:
    split: str  # list file name without .txt
    path: Path  # the video file or frame folder
    label: int
    where: str  # annotation file:line (or the path) for messages


def index_by_stem(root: Path, folders: bool = False) -> dict[str, Path]:
    """Map file stem (or folder name) -> path for everything under root; hidden entries skipped.

    Annotations name videos by id, while the files may sit in per-class or per-split sub-folders and
    carry any extension (after prep.resize), so we look them up by stem.
    """
    if not root.is_dir():
        raise UserError(f"{root} is not a folder")
    index: dict[str, Path] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if folders:
            for d in dirs:
                index.setdefault(d, Path(folder) / d)
            continue
        for f in sorted(files):
            p = Path(folder) / f
            if not f.startswith(".") and p.suffix.lower() in VIDEO_EXTENSIONS:
                index.setdefault(p.stem, p)
    return index


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    return path


# ------------------------------------------------------------------------------------------ kinetics


def read_classes(path: Path) -> list[str]:
    """A classes.txt (line i = the name of label i, as prep.lists writes it); blank lines skipped."""
    names = [line.strip() for line in _require(path, "classes file").read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if not names:
        raise UserError(f"{path}: no class names")
    repeated = [n for n, k in Counter(names).items() if k > 1]
    if repeated:
        raise UserError(f"{path}: class {repeated[0]!r} appears more than once")
    return names


def kinetics_classes(rows: list[tuple[str, dict]], classes_file: Path | None) -> list[str]:
    """Class ids: the order of --classes when given (so a val-only run numbers classes as the full run
    did), else the sorted names found in the CSVs, with a warning when no train rows are among them."""
    found = sorted({row["label"] for _, row in rows})
    if classes_file is None:
        if rows and not any(row["split"] == "train" for _, row in rows):
            print(f"warning: class ids are the positions of the {len(found)} label names in these CSVs only "
                  "(no train rows): if a class is absent, ids differ from a list made with the train CSV; "
                  "pass --classes DIR/classes.txt from that run", file=sys.stderr)  # fmt: skip
        return found
    classes = read_classes(classes_file)
    known = set(classes)
    for where, row in rows:
        if row["label"] not in known:
            raise UserError(f"{where}: label {row['label']!r} is not in {classes_file}"
                            + _did_you_mean(row["label"], classes))  # fmt: skip
    return classes


def kinetics_samples(
    csv_files: list[Path], videos: Path, classes_file: Path | None = None
) -> tuple[list[Sample], list[str], list[dict], list[str]]:
    """Rows of the official Kinetics CSVs -> samples; also returns classes, rows without a video, fields."""
    rows: list[tuple[str, dict]] = []
    fields: list[str] = []
    for csv_file in csv_files:
        _require(csv_file, "Kinetics CSV")
        with open(csv_file, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in KINETICS_COLUMNS if c not in header]
            if missing:
                hint = " (test CSVs without labels cannot make a list)" if "label" in missing else ""
                raise UserError(f"{csv_file}:1: missing column(s) {', '.join(missing)}; expected "
                                f"{','.join(KINETICS_COLUMNS)}, found {','.join(header)}{hint}")  # fmt: skip
            fields = fields or list(header)
            for line, row in enumerate(reader, start=2):
                where = f"{csv_file}:{line}"
                if not (row.get("label") or "").strip():
                    raise UserError(f"{where}: empty label (test rows without labels cannot make a list)")
                if not SPLIT_NAME.fullmatch(row.get("split") or "") or row["split"] == "classes":
                    raise UserError(f"{where}: split {row.get('split')!r} cannot name a list file")
                rows.append((where, row))
    classes = kinetics_classes(rows, classes_file)
    label_of = {name: i for i, name in enumerate(classes)}
    index = index_by_stem(videos)
    samples, no_video = [], []
    for where, row in rows:
        try:
            start, end = int(float(row["time_start"])), int(float(row["time_end"]))
        except (TypeError, ValueError):
            raise UserError(f"{where}: time_start/time_end must be numbers, got "
                            f"{row['time_start']!r}, {row['time_end']!r}") from None  # fmt: skip
        stem = f"{row['youtube_id']}_{start:06d}_{end:06d}"
        path = index.get(stem)
        if path is None:
            no_video.append(row)
            continue
        samples.append(Sample(row["split"], path, label_of[row["label"]], where))
    return samples, classes, no_video, fields


# ------------------------------------------------------------------------------- something-something


def _load_json(path: Path, what: str):
    _require(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def sthv2_samples(annotations: Path, videos: Path) -> tuple[list[Sample], list[str], list[str]]:
    """Something-Something V2: label = labels[template without brackets]; video <id>.webm."""
    labels = _load_json(annotations / STHV2_FILES["labels"], "Something-Something V2 labels JSON")
    if not isinstance(labels, dict):
        raise UserError(f"{annotations / STHV2_FILES['labels']}: expected an object {{label: index}}")
    try:
        by_index = {int(v): k for k, v in labels.items()}
    except (TypeError, ValueError):
        raise UserError(f"{annotations / STHV2_FILES['labels']}: indices must be integers") from None
    if sorted(by_index) != list(range(len(labels))):
        raise UserError(f"{annotations / STHV2_FILES['labels']}: indices are not 0..{len(labels) - 1}")
    classes = [by_index[i] for i in range(len(labels))]
    index = index_by_stem(videos)
    samples, missing = [], []
    for split in ("train", "val"):
        path = annotations / STHV2_FILES[split]
        entries = _load_json(path, f"Something-Something V2 {split} JSON")
        if not isinstance(entries, list):
            raise UserError(f"{path}: expected a list of {{id, label, template, placeholders}} entries")
        for i, entry in enumerate(entries):
            where = f"{path} entry {i}"
            if not isinstance(entry, dict) or "id" not in entry or "template" not in entry:
                raise UserError(f"{where}: needs 'id' and 'template' keys, got {str(entry)[:80]}")
            name = entry["template"].replace("[", "").replace("]", "")
            if name not in labels:
                raise UserError(f"{where}: template {entry['template']!r} is not in "
                                f"{STHV2_FILES['labels']}{_did_you_mean(name, list(labels))}")  # fmt: skip
            video = index.get(str(entry["id"]))
            if video is None:
                missing.append(f"{where}\tno video named {entry['id']}.* under {videos}")
                continue
            samples.append(Sample(split, video, int(labels[name]), where))
    return samples, classes, missing


def sthv1_samples(annotations: Path, frames: Path) -> tuple[list[Sample], list[str], list[str]]:
    """Something-Something V1: `id;label` CSVs, frame folders <id>/00001.jpg; classes sorted (as TSM)."""
    labels_file = _require(annotations / STHV1_FILES["labels"], "Something-Something V1 labels CSV")
    names = [line.strip() for line in labels_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    classes = sorted(set(names))
    label_of = {name: i for i, name in enumerate(classes)}
    if not frames.is_dir():
        raise UserError(f"{frames} is not a folder (expected one frame folder per video id)")
    samples, missing = [], []
    for split in ("train", "val"):
        path = _require(annotations / STHV1_FILES[split], f"Something-Something V1 {split} CSV")
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            parts = line.split(";", 1)
            if len(parts) != 2:
                raise UserError(f"{where}: expected 'id;label', got {line[:80]!r}")
            vid, name = parts[0].strip(), parts[1].strip()
            if name not in label_of:
                raise UserError(f"{where}: label {name!r} is not in {STHV1_FILES['labels']}"
                                f"{_did_you_mean(name, classes)}")  # fmt: skip
            folder = frames / vid
            if not folder.is_dir():
                missing.append(f"{where}\tno frame folder {folder}")
                continue
            samples.append(Sample(split, folder, label_of[name], where))
    return samples, classes, missing


# ------------------------------------------------------------------------------------------- folders


def _class_entries(class_dir: Path, problems: list[str]) -> list[Path]:
    """Videos and frame folders (folders holding images) directly inside one class folder. What is
    neither a regular file nor a folder (a FIFO, a socket, a device, a broken link) is reported in
    `problems`, never dropped without a word; other files (notes.txt) are not videos and are skipped."""
    entries = []
    for p in sorted(class_dir.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS:
            entries.append(p)
        elif p.is_dir() and any(q.suffix.lower() in IMAGE_EXTENSIONS for q in p.iterdir()):
            entries.append(p)
        elif not p.is_file() and not p.is_dir():
            problems.append(f"{p}\t{_odd_file(p)}: left out")
    return entries


def _odd_file(path: Path) -> str:
    """What a path that is neither a regular file nor a folder is, in words."""
    if not path.exists():
        return "a broken symbolic link" if path.is_symlink() else "gone while listing"
    mode = path.stat().st_mode
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
             (stat.S_ISBLK, "a device"))  # fmt: skip
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _warn_empty_class(class_dir: Path, label: int) -> None:
    print(f"warning: class folder {class_dir} holds no videos or frame folders: it keeps class id {label} "
          "(classes.txt lists it) but has no samples", file=sys.stderr)  # fmt: skip


def _class_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise UserError(f"{root} is not a folder")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise UserError(f"{root} has no class sub-folders (expected ROOT/<class>/<video or frame folder>)")
    return dirs


def folder_samples(
    root: Path, splits: list[str], val_fraction: float, seed: int
) -> tuple[list[Sample], list[str], list[str]]:
    """Class-per-folder trees: ROOT/<class>/x (one list or a per-class train/val split), or
    ROOT/<split>/<class>/x with --splits. Returns samples, classes (the sorted folder names: an empty
    class folder keeps its id, with a warning) and report lines for entries left out."""
    problems: list[str] = []
    if splits:
        per_split = {}
        for split in splits:
            if not (root / split).is_dir():
                raise UserError(f"{root / split}: split folder not found (--splits {' '.join(splits)})")
            per_split[split] = {d.name: d for d in _class_dirs(root / split)}
        classes = sorted(set().union(*per_split.values()))
        samples = []
        for split, dirs in per_split.items():
            for name, d in sorted(dirs.items()):
                entries = _class_entries(d, problems)
                if not entries:
                    _warn_empty_class(d, classes.index(name))
                samples += [Sample(split, p, classes.index(name), str(p)) for p in entries]
        return samples, classes, problems
    dirs = _class_dirs(root)
    classes = [d.name for d in dirs]
    samples = []
    for label, d in enumerate(dirs):
        entries = _class_entries(d, problems)
        if not entries:
            _warn_empty_class(d, label)
        if val_fraction <= 0:
            samples += [Sample("all", p, label, str(p)) for p in entries]
            continue
        order = entries[:]
        random.Random(f"{seed}/{d.name}").shuffle(order)
        n_val = round(len(order) * val_fraction)
        val = set(order[:n_val])
        samples += [Sample("val" if p in val else "train", p, label, str(p)) for p in entries]
    return samples, classes, problems


# ---------------------------------------------------------------------------------------- the writer


def count_frames(job: tuple[str, str]) -> tuple[int, str]:
    """(num_frames, problem) for a video or frame folder; problem "" when the entry is usable."""
    path, mode = job
    try:
        if Path(path).is_dir():
            n = count_images(path)
            return n, "" if n else "zero frames: no images in the frame folder"
        info = probe_video(path, count=mode)
    except ProbeError as e:
        return 0, str(e)
    except Exception as e:  # one odd file must not end a run over a whole dataset: report it
        return 0, f"undecodable: unexpected {type(e).__name__} while reading: {e}"
    if info.decode_error:
        return info.num_frames, f"undecodable: {info.decode_error} after {info.num_frames} frames"
    if info.num_frames == 0:
        return 0, "zero frames: the video stream delivers no frames"
    return info.num_frames, ""


def write_lists(samples: list[Sample], classes: list[str], out: Path, problems: list[str], jobs: int,
                count: str, quiet: bool = False) -> dict[str, int]:  # fmt: skip
    """Count frames in parallel, then write OUT/<split>.txt, OUT/classes.txt and OUT/lists-report.tsv."""
    out.mkdir(parents=True, exist_ok=True)
    paths = sorted({str(s.path) for s in samples})
    counted: dict[str, tuple[int, str]] = {}
    for (path, _), result in parallel_map(count_frames, [(p, count) for p in paths], jobs, "count frames",
                                          quiet=quiet):  # fmt: skip
        counted[path] = result
    problems = list(problems)
    lines: dict[str, list[str]] = {}
    first: dict[tuple[str, object], tuple[str, Path]] = {}  # (split, file identity) -> (where, path) first
    videos: dict[str, list[str]] = {}
    for s in samples:
        n, problem = counted[str(s.path)]
        if problem:
            problems.append(f"{s.where}\t{s.path}: {problem}")
            continue
        key = (s.split, file_identity(str(s.path)))
        if key in first:  # lists hold each file once (the loader and prep.validate refuse duplicates)
            where, kept = first[key]
            again = "annotated again" if kept == s.path else f"a link to {kept}, already listed"
            problems.append(f"{s.where}\t{s.path}: {again} in {s.split} (kept: {where})")
            continue
        rel = Path(os.path.relpath(s.path, out)).as_posix()
        try:
            line = format_line(rel, n, s.label)
        except ValueError as e:  # e.g. a folder "take 2": its line would end in "2 8 0"
            problems.append(f"{s.where}\t{e}")
            continue
        first[key] = (s.where, s.path)
        lines.setdefault(s.split, []).append(f"{line}\n")
        videos.setdefault(s.split, []).append(str(s.path))
    for split, split_lines in lines.items():
        atomic_write_text(out / f"{split}.txt", "".join(split_lines))
        if any(not Path(p).is_dir() for p in videos[split]):  # frame folders need no packet index
            write_packet_index(out / f"{split}.txt", videos[split], jobs, quiet)
    atomic_write_text(out / "classes.txt", "".join(f"{c}\n" for c in classes))
    atomic_write_text(out / "lists-report.tsv", "".join(p.replace("\n", " ") + "\n" for p in problems))
    sizes = {split: len(v) for split, v in lines.items()}
    summary = (
        ", ".join(f"{out / split}.txt: {n}" for split, n in sorted(sizes.items())) or "no usable entries"
    )
    print(f"{summary}; {len(classes)} classes; {len(problems)} left out"
          + (f" (see {out / 'lists-report.tsv'})" if problems else ""))  # fmt: skip
    return sizes


def write_missing_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    """The Kinetics CSV rows without a video, with the original columns (ready for a downloader)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m prep.lists", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="dataset", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, formatter_class=DefaultsHelpFormatter)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--out", type=Path, required=True, help="folder for <split>.txt, classes.txt, reports")
        q.add_argument("--jobs", type=positive_int, default=default_jobs(), help="parallel frame counters")
        q.add_argument("--count", choices=("decode", "packets"), default="decode",
                       help="count decoded frames (exact) or demuxed packets (faster)")  # fmt: skip
        q.add_argument("--quiet", action="store_true", help="no progress bar")

    k = add("kinetics", help="official CSVs label,youtube_id,time_start,time_end,split")
    k.add_argument("--csv", type=Path, nargs="+", required=True, help="train.csv validate.csv ...")
    k.add_argument("--videos", type=Path, required=True,
                   help="folder (searched recursively) of {youtube_id}_{start:06d}_{end:06d}.*")  # fmt: skip
    k.add_argument("--classes", type=Path, default=None,
                   help="classes.txt fixing the class ids (line i = label i), e.g. from the run on the train "
                   "CSV; default: the sorted label names of the CSVs given")  # fmt: skip
    common(k)
    v2 = add("sthv2", help="Something-Something V2 labels/train/validation JSON + <id>.webm")
    v2.add_argument(
        "--annotations", type=Path, required=True, help=f"folder with {', '.join(STHV2_FILES.values())}"
    )
    v2.add_argument("--videos", type=Path, required=True, help="folder of <id>.webm (or resized <id>.<ext>)")
    common(v2)
    v1 = add("sthv1", help="Something-Something V1 ';' CSVs + JPEG frame folders <id>/00001.jpg")
    v1.add_argument(
        "--annotations", type=Path, required=True, help=f"folder with {', '.join(STHV1_FILES.values())}"
    )
    v1.add_argument("--frames", type=Path, required=True, help="folder of <id>/ frame folders")
    common(v1)
    f = add("folders", help="class-per-folder trees (UCF101 / HMDB style)")
    f.add_argument("--root", type=Path, required=True, help="ROOT/<class>/<video or frame folder>")
    f.add_argument("--splits", nargs="+", default=[],
                   help="split folder names: ROOT/<split>/<class>/... -> <split>.txt")  # fmt: skip
    f.add_argument("--val-fraction", type=float, default=0.0,
                   help="without --splits: this fraction of each class -> val.txt (0: all.txt)")  # fmt: skip
    f.add_argument("--seed", type=int, default=0, help="seed of the --val-fraction split")
    common(f)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problems: list[str] = []
    if args.dataset == "kinetics":
        samples, classes, no_video, fields = kinetics_samples(args.csv, args.videos, args.classes)
        write_missing_csv(args.out / "missing.csv", fields, no_video)
        if no_video:
            print(
                f"{len(no_video)} CSV rows have no video under {args.videos}: see {args.out / 'missing.csv'}"
            )
    elif args.dataset == "sthv2":
        samples, classes, problems = sthv2_samples(args.annotations, args.videos)
    elif args.dataset == "sthv1":
        samples, classes, problems = sthv1_samples(args.annotations, args.frames)
    else:
        if args.splits and args.val_fraction:
            raise UserError("--splits and --val-fraction exclude each other")
        if not 0.0 <= args.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
        samples, classes, problems = folder_samples(args.root, args.splits, args.val_fraction, args.seed)
    if not samples:
        raise UserError("no annotated entry has a video / frame folder: check the --videos/--frames folder")
    dup = [p for p, n in Counter(str(s.path) for s in samples).items() if n > 1]
    if dup:
        print(f"note: {len(dup)} files are annotated more than once (e.g. {dup[0]})")
    write_lists(samples, classes, args.out, problems, args.jobs, args.count, args.quiet)
    return 0


if __name__ == "__main__":
    run_cli(main)
