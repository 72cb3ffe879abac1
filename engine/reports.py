"""What a test run leaves on disk, and fusion of what earlier runs left: score dumps (.npz), their
reports (metrics JSON, per-class and confusion CSVs, confusion PNG), the console table, and
`fuse_dumps` (several models, or one model under several view settings). Every file is written
atomically: a temp file next to the target, then os.replace."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import numpy as np

from engine.config import Config, ConfigError
from engine.fileio import atomic_write
from engine.scoring import FUSE_MODES, confusion_matrix, fuse_views

log = logging.getLogger(__name__)


class DumpError(ValueError):
    """A score dump that cannot be used (missing keys, disagreeing ids/labels); names the file."""


def read_class_names(num_classes: int, classes_file: str = "", cfg: Config | None = None) -> list[str] | None:
    """Class names, line i = class i: `classes_file` when given (it must fit the model), else classes.txt
    in the config's data.root or beside its val_list; None (use class indices) when none fits."""
    if classes_file:
        path = Path(classes_file)
        if not path.is_file():
            raise ConfigError(f"--classes: {path} not found")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if len(names) != num_classes:
            raise ConfigError(f"--classes: {path} has {len(names)} names, the model {num_classes} classes")
        return names
    if cfg is None:
        return None
    folders = [cfg.data.root, str(Path(cfg.data.val_list).parent) if cfg.data.val_list else ""]
    for folder in dict.fromkeys(f for f in folders if f):
        path = Path(folder) / "classes.txt"
        if path.is_file():
            names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            if len(names) == num_classes:
                return names
            log.warning("%s has %d names, the model %d: using class indices", path, len(names), num_classes)
            return None
    return None


def save_dump(
    path: Path, ids: np.ndarray, labels: np.ndarray, class_names: list[str] | None, **arrays
) -> None:
    """A .npz of ids, labels, class_names (when known) and `arrays` (view_logits, or scores for a fusion).

    Strings are stored as fixed-width unicode arrays, so np.load needs no pickle.
    """
    content = {"ids": ids.astype(np.int64), "labels": labels.astype(np.int64), **arrays}
    if class_names is not None:
        content["class_names"] = np.array(class_names, dtype=str)
    atomic_write(Path(path), lambda f: np.savez(f, **content))


def load_dump(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise DumpError(f"{path}: score dump not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            dump = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise DumpError(f"{path}: not a readable .npz score dump ({e})") from None
    missing = {"ids", "labels"} - dump.keys()
    if missing or not ({"view_logits", "scores"} & dump.keys()):
        raise DumpError(
            f"{path}: not a score dump from evaluate.py (has {sorted(dump)}, needs ids, labels and "
            "view_logits or scores)"
        )
    rows = {k: len(dump[k]) for k in ("ids", "labels", "view_logits", "scores") if k in dump}
    if len(set(rows.values())) != 1:
        raise DumpError(f"{path}: arrays of different lengths {rows}")
    return dump


def per_class_rows(cm: np.ndarray, names: list[str]) -> list[list]:
    """class, name, videos, correct, accuracy % (empty for a class without videos)."""
    rows = []
    for c, name in enumerate(names):
        count, correct = int(cm[c].sum()), int(cm[c, c])
        rows.append([c, name, count, correct, f"{100 * correct / count:.2f}" if count else ""])
    return rows


def write_reports(
    out: Path,
    labels: np.ndarray,
    scores: np.ndarray,
    class_names: list[str] | None,
    metrics: dict,
    title: str,
) -> list[Path]:
    """Next to the dump <out>.npz: <out>.metrics.json, .per_class.csv, .confusion.csv and .confusion.png,
    and above ANNOTATE_UP_TO classes .confused_pairs.csv (the most confused pairs, as in the PNG)."""
    num_classes = scores.shape[1]
    names = class_names or [str(c) for c in range(num_classes)]
    cm = confusion_matrix(labels, scores.argmax(axis=1), num_classes)
    paths = report_paths(out)

    atomic_write(paths[0], lambda f: f.write(json.dumps(metrics, indent=2) + "\n"), binary=False)

    def per_class(f):
        w = csv.writer(f)
        w.writerow(["class", "name", "videos", "correct", "accuracy"])
        w.writerows(per_class_rows(cm, names))

    def confusion(f):
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *names])
        w.writerows([name, *row.tolist()] for name, row in zip(names, cm, strict=True))

    atomic_write(paths[1], per_class, binary=False)
    atomic_write(paths[2], confusion, binary=False)
    atomic_write(paths[3], lambda f: plot_confusion(cm, names, title, f))
    if num_classes > ANNOTATE_UP_TO:  # the pairs the PNG shows beside the matrix, as a table
        paths.append(write_confused_pairs(Path(f"{Path(out).with_suffix('')}.confused_pairs.csv"), cm, names))
    return paths


def report_paths(out: Path) -> list[Path]:
    """The reports beside dump <out>.npz: .metrics.json, .per_class.csv, .confusion.csv, .confusion.png."""
    stem = Path(out).with_suffix("")
    return [Path(f"{stem}.{s}") for s in ("metrics.json", "per_class.csv", "confusion.csv", "confusion.png")]


ANNOTATE_UP_TO = 30  # classes: beyond this, counts in the cells and full names no longer fit
TOP_PAIRS = 20  # above ANNOTATE_UP_TO classes: the most confused pairs beside the matrix and in a CSV


def short_name(name: str, width: int = 28) -> str:
    """A class name cut to `width` characters (Something-Something's are whole sentences)."""
    return name if len(name) <= width else name[: width - 1] + "\u2026"


def confused_pairs(cm: np.ndarray, top: int = TOP_PAIRS) -> list[tuple[int, int, int, float]]:
    """The largest off-diagonal cells: (true, predicted, videos, fraction of the true class's videos),
    most videos first (ties: the larger fraction, then the lower class indices). At 174 or 400 classes the
    matrix is too fine to read; these pairs are what a researcher looks for in it."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    counts = cm.sum(axis=1)
    cells = [(int(off[t, p]), t, p) for t, p in zip(*np.nonzero(off), strict=True)]
    cells.sort(key=lambda c: (-c[0], -c[0] / counts[c[1]], c[1], c[2]))
    return [(int(t), int(p), n, n / float(counts[t])) for n, t, p in cells[:top]]


def write_confused_pairs(path: Path, cm: np.ndarray, names: list[str]) -> Path:
    """<out>.confused_pairs.csv: the TOP_PAIRS most confused (true, predicted) pairs, as in the PNG."""

    def rows(f):
        w = csv.writer(f)
        w.writerow(["true", "true_name", "predicted", "predicted_name", "videos", "fraction_of_true"])
        w.writerows([t, names[t], p, names[p], n, f"{frac:.4f}"] for t, p, n, frac in confused_pairs(cm))

    return atomic_write(path, rows, binary=False)


def plot_confusion(cm: np.ndarray, names: list[str], title: str, f: io.IOBase) -> None:
    """Row-normalised confusion matrix as PNG. A bare Figure renders with Agg and touches no pyplot state.

    Up to ANNOTATE_UP_TO classes every cell shows its count and the ticks the (shortened) names. Beyond,
    a bar chart of the TOP_PAIRS most confused pairs (true -> predicted, named) stands beside the matrix,
    whose colours follow a square-root scale so that sparse confusions stay visible; up to 60 classes the
    ticks still name the classes, beyond (Sth-Sth's 174, Kinetics' 400) they show class indices every few
    classes and the names are in the .confusion.csv beside the PNG.
    """
    from matplotlib.colors import Normalize, PowerNorm
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    num_classes = len(names)
    counts = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, counts, out=np.zeros(cm.shape, dtype=float), where=counts > 0)
    named = num_classes <= 60
    many = num_classes > ANNOTATE_UP_TO
    label_room = 0.075 * (max((len(short_name(n)) for n in names), default=1) + 5) if named else 0.4
    cells = 0.42 * num_classes if named else 10.0  # inches for the matrix itself
    side = max(cells, 3.0) + label_room + 1.2
    pairs_width = 9.0 if many else 0.0
    fig = Figure(figsize=(side + 1.3 + pairs_width, side), layout="constrained")
    if many:
        ax, pairs_ax = fig.subplots(1, 2, width_ratios=[side + 1.3, pairs_width])
    else:
        ax, pairs_ax = fig.add_subplot(), None
    scale = PowerNorm(0.5, vmin=0, vmax=1) if many else Normalize(vmin=0, vmax=1)
    image = ax.imshow(norm, cmap="Blues", norm=scale, interpolation="nearest")
    label = "fraction of the true class" + (" (square-root scale)" if many else "")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label=label)
    ax.set_title(title)
    if named:
        short = [f"{short_name(n)} ({c})" if n != str(c) else n for c, n in enumerate(names)]
        ax.set_xticks(range(num_classes), short, rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
        ax.set_yticks(range(num_classes), short, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    else:
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(nbins=20, integer=True))
        ax.set_xlabel("predicted class (index; names in the .confusion.csv)")
        ax.set_ylabel("true class (index)")
    if not many:
        size = 8 if num_classes <= 15 else 7
        for (row, col), count in np.ndenumerate(cm):
            if count:
                colour = "white" if norm[row, col] > 0.5 else "black"
                ax.text(col, row, str(count), ha="center", va="center", fontsize=size, color=colour)
    if pairs_ax is not None:
        plot_confused_pairs(pairs_ax, cm, names)
    fig.savefig(f, format="png", dpi=100)


def plot_confused_pairs(ax, cm: np.ndarray, names: list[str]) -> None:
    """Horizontal bars of the most confused pairs, the largest on top, each labelled with its share."""
    pairs = confused_pairs(cm)
    ax.set_title(f"the {len(pairs)} most confused pairs (true \u2192 predicted)")
    if not pairs:
        ax.text(0.5, 0.5, "no confusions", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_axis_off()
        return
    ys = list(range(len(pairs)))[::-1]
    videos = [n for _, _, n, _ in pairs]
    ax.barh(ys, videos, color="C3", height=0.6)
    def named(c: int) -> str:
        return names[c] if names[c] == str(c) else f"{short_name(names[c], 44)} ({c})"

    labels = [f"{named(t)}\n\u2192 {named(p)}" for t, p, _, _ in pairs]  # two lines: Sth-Sth names are long
    ax.set_yticks(ys, labels, fontsize=8)
    for y, (_, _, n, frac) in zip(ys, pairs, strict=True):
        ax.text(n, y, f" {n} ({100 * frac:.0f}% of true)", va="center", fontsize=8)
    ax.set_xlim(0, max(videos) * 1.35)
    ax.set_xlabel("videos")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(axis="x", alpha=0.3)


def print_table(rows: list[tuple[str, str]], title: str) -> None:
    from rich.table import Table

    from engine.progress import log_console

    table = Table(title=title)
    for name, _ in rows:
        table.add_column(name, justify="right", no_wrap=True)
    table.add_row(*(value for _, value in rows))
    log_console().print(table)


def metric_rows(metrics: dict) -> list[tuple[str, str]]:
    rows = [("videos", str(metrics["videos"]))]
    rows += [(name, f"{metrics[key]:.2f}") for key, name in (("top1", "top-1 %"), ("top5", "top-5 %"))]
    rows.append(("mean class %", f"{metrics['mean_class']:.2f}"))
    if "videos_per_s" in metrics:
        rows.append(("videos/s", f"{metrics['videos_per_s']:.1f}"))
    return rows


def fuse_dumps(
    paths: list[str | Path], mode: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str] | None]:
    """Mean over the dumps of each dump's view-fused scores, every dump weighted equally.

    Like the seeds' score-fusion scripts: each input's views are fused first (mean logits or mean softmax),
    then the inputs are averaged. Ids and labels must agree (a dump is sorted by id when read), and the
    error names the file that differs. A fused file (scores, no view_logits) can be an input if it was
    fused with the same mode.
    """
    if mode not in FUSE_MODES:
        raise ValueError(f"--fuse-mode must be one of {', '.join(FUSE_MODES)}, got {mode!r}")
    total, ref_ids, ref_labels, ref_path, class_names = None, None, None, None, None
    for path in paths:
        dump = load_dump(path)
        order = np.argsort(dump["ids"], kind="stable")
        ids, labels = dump["ids"][order], dump["labels"][order]
        if "view_logits" in dump:
            scores = fuse_views(dump["view_logits"][order], mode)
        else:
            stored = str(dump.get("fuse_mode", "unknown"))
            if stored != mode:
                raise DumpError(f"{path}: holds scores fused as {stored}, cannot fuse them as {mode}")
            scores = dump["scores"][order].astype(np.float32)
        if total is None:
            total, ref_ids, ref_labels, ref_path = scores.astype(np.float64), ids, labels, path
            class_names = dump["class_names"].tolist() if "class_names" in dump else None
            continue
        if len(ids) != len(ref_ids) or (ids != ref_ids).any():
            missing = np.setdiff1d(ref_ids, ids)
            extra = np.setdiff1d(ids, ref_ids)
            raise DumpError(
                f"{path}: video ids differ from {ref_path} ({len(missing)} missing, e.g. "
                f"{missing[:3].tolist()}; {len(extra)} extra, e.g. {extra[:3].tolist()}); "
                "were both made from the same list?"
            )
        if (labels != ref_labels).any():
            bad = ids[labels != ref_labels]
            raise DumpError(
                f"{path}: labels differ from {ref_path} for {len(bad)} videos (ids {bad[:5].tolist()})"
            )
        if scores.shape[1] != total.shape[1]:
            raise DumpError(f"{path}: {scores.shape[1]} classes, {ref_path} has {total.shape[1]}")
        total += scores
    if total is None:
        raise DumpError("--fuse needs at least one dump")
    return ref_ids, ref_labels, (total / len(paths)).astype(np.float32), class_names


