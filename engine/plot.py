"""Pictures of what runs leave behind: training curves from metrics.jsonl (several runs overlaid) and the
profiler's table as a bar chart (CPU-ms per clip, cheapest first).

    python -m engine.plot runs/tsm_k400 [runs/tam_k400 ...] [--out curves.png]

train.py writes RUN_DIR/curves.png itself at the end of every job (rank 0; `save_run_curves` only warns
when it cannot). Figures are bare matplotlib Figures rendered with Agg: no pyplot state, no display.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from engine.fileio import atomic_write

log = logging.getLogger(__name__)

# (record kind, key, panel title, y label, scale): the train panels over optimizer steps, val over epochs
TRAIN_PANELS = (
    ("loss", "training loss", "loss", 1.0),
    ("lr", "learning rate", "lr", 1.0),
    ("clips_per_s", "throughput", "clips/s (all ranks)", 1.0),
    ("data_wait", "waiting for data", "% of wall time", 100.0),
)
VAL_PANELS = (("top1", "validation top-1", "top-1 %"), ("top5", "validation top-5", "top-5 %"))


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl (a line cut by a crash is skipped); ValueError when absent."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir}: no metrics.jsonl (not a train.py run folder?)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def run_labels(run_dirs: Sequence[str | Path]) -> list[str]:
    """Short legend names: the folder name, with as many parent folders as it takes to tell runs apart."""
    parts = [Path(d).resolve().parts for d in run_dirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(d) for d in run_dirs]


def run_classes(records: list[dict]) -> int | None:
    """model.num_classes from the run's start record (train.py stores the config there); None if absent."""
    for r in records:
        classes = ((r.get("config") or {}).get("model") or {}).get("num_classes")
        if r.get("kind") == "start" and isinstance(classes, int):
            return classes
    return None


def top_k_name(classes: list[int | None]) -> str:
    """The name of the "top5" metric, whose k is min(5, classes) (compute_metrics): 'top-5', 'top-4' for
    4-class runs, 'top-k (k = 4, 5)' for runs of both kinds in one panel."""
    ks = sorted({min(5, c) for c in classes if c is not None})
    if len(ks) == 1:
        return f"top-{ks[0]}"
    return f"top-k (k = {', '.join(map(str, ks))})" if ks else "top-5"


def plot_curves(runs: dict[str, list[dict]], f: io.IOBase, title: str = "") -> None:
    """Loss, lr, clips/s and data wait over steps; val (and EMA val, dashed) top-1/top-k over epochs, the
    k named as it is (min(5, classes)) and the accuracy axes never past 100 %."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(13, 10.5))
    axes = fig.subplots(3, 2, gridspec_kw={"left": 0.07, "right": 0.98, "bottom": 0.05, "top": 0.93,
                                           "hspace": 0.38, "wspace": 0.18})  # fmt: skip
    # fixed margins: a constrained layout would double the drawing time, at the end of every run
    classes = [run_classes(records) for records in runs.values()]
    k_name = top_k_name(classes)
    few = bool(classes) and all(c is not None and c <= 5 for c in classes)
    every = " (k = all classes: always 100 %)" if few else ""
    val_panels = tuple(
        (key, t.replace("top-5", k_name) + (every if key == "top5" else ""), y.replace("top-5", k_name), 1.0)
        for key, t, y in VAL_PANELS
    )
    panels = list(zip(axes.flat, TRAIN_PANELS + val_panels, strict=True))
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for (name, records), colour in zip(runs.items(), colours, strict=True):
        train = [r for r in records if r.get("kind") == "train"]
        for ax, (key, _, _, scale) in panels[:4]:
            points = [(r["step"], r[key] * scale) for r in train if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points, strict=True), color=colour, label=name, linewidth=1.2)
        for ax, (key, _, _, _) in panels[4:]:
            for kind, style in (("val", "-"), ("val_ema", "--")):
                points = [(r["epoch"], r[key]) for r in records if r.get("kind") == kind and key in r]
                if points:
                    label = name if kind == "val" else f"{name} (EMA)"
                    ax.plot(
                        *zip(*points, strict=True), style, color=colour, marker="o", markersize=3, label=label
                    )
    for ax, (key, panel_title, ylabel, _) in panels:
        ax.set_title(panel_title)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("epoch" if key in ("top1", "top5") else "optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no fractional epochs or steps
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if ax.lines:
            ax.legend(fontsize=8)
            if key in ("top1", "top5"):  # whole epochs from 1, even for a single validation
                last = max(max(line.get_xdata()) for line in ax.lines)
                ax.set_xlim(0.5, last + 0.5)
                low, high = ax.get_ylim()
                ax.set_ylim(max(low, -0.5), min(high, 100.5))  # a percentage: no axis past 100
        else:
            ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes, color="grey")
    if title:
        fig.suptitle(title)
    fig.savefig(f, format="png", dpi=100)


def save_curves(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """curves PNG of the runs (legend names from their folders), written atomically."""
    labels = run_labels(run_dirs)
    runs = {label: read_metrics(d) for label, d in zip(labels, run_dirs, strict=True)}
    title = ", ".join(labels)
    if len(title) > 100:
        title = f"{len(labels)} runs"
    return atomic_write(out, lambda f: plot_curves(runs, f, title))


def save_run_curves(run_dir: str | Path) -> Path | None:
    """RUN_DIR/curves.png at the end of training; a failure is a warning, never the run's failure."""
    try:
        return save_curves([run_dir], Path(run_dir) / "curves.png")
    except Exception as e:  # a plot is a convenience: nothing about it may fail the run
        log.warning("could not write %s/curves.png: %s: %s", run_dir, type(e).__name__, e)
        return None


def plot_throughput(
    names: Sequence[str],
    clips_per_s: Sequence[float],
    cpu_ms_per_clip: Sequence[float],
    title: str,
    f: io.IOBase,
    errors: Sequence[str] = (),
) -> None:
    """Horizontal bars of CPU-ms per clip, the cheapest route on top, each labelled with its CPU-ms and
    clips/s. Ordered by cost, not speed: on a shared machine clips/s flatters the route with more threads
    (docs/BENCHMARKS.md), CPU time per clip does not. A failed route is listed last, labelled with its
    error."""
    from matplotlib.figure import Figure

    errors = list(errors) or [""] * len(names)
    rows = sorted(
        zip(names, clips_per_s, cpu_ms_per_clip, errors, range(len(names)), strict=True),
        key=lambda r: (not r[1], r[2] if r[1] else 0.0, r[4]),  # failed (no clips/s) last, in table order
    )
    height = 1.2 + 0.55 * len(rows)
    fig = Figure(figsize=(10, height), layout="constrained")
    ax = fig.add_subplot()
    ys = list(range(len(rows)))[::-1]  # the cheapest on top
    costs = [ms if rate else 0.0 for _, rate, ms, _, _ in rows]
    ax.barh(ys, costs, color=[f"C{r[4] % 10}" for r in rows], height=0.6)  # a route keeps its colour
    ax.set_yticks(ys, [r[0] for r in rows], fontsize=9)
    top = max(costs, default=0) or 1.0
    for y, (_, rate, ms, error, _) in zip(ys, rows, strict=True):
        failed = error[:70] + ("..." if len(error) > 70 else "") if error else "failed"
        text = f"{ms:.0f} CPU-ms/clip, {rate:.1f} clips/s" if rate else failed
        ax.text((ms if rate else 0.0) + top * 0.01, y, text, va="center", fontsize=9)
    ax.set_xlim(0, top * 1.45)  # room for the labels
    ax.set_xlabel("CPU-ms per clip, all processes of the route (lower is better)")
    ax.set_title(title, fontsize=9, wrap=True)
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(f, format="png", dpi=100)


def plot_timeline(
    spans: Sequence[tuple[int, int]], probs, names: Sequence[str], title: str, f: io.IOBase, top: int = 5
) -> None:
    """Class probability over a long video: one line per class among the `top` with the highest
    probability in any window, each point a window at its centre frame; below, each window's extent
    (first to last sampled frame), in four staggered rows so that overlapping windows stay apart."""
    import numpy as np
    from matplotlib.figure import Figure

    probs = np.asarray(probs)
    centres = [(a + b) / 2 for a, b in spans]
    classes = np.argsort(-probs.max(axis=0), kind="stable")[:top]
    fig = Figure(figsize=(12, 5), layout="constrained")
    ax, bars = fig.subplots(2, 1, sharex=True, height_ratios=[5, 1])
    for i, c in enumerate(classes):
        ax.plot(centres, 100 * probs[:, c], marker="o", markersize=3, color=f"C{i}", label=names[c])
    ax.set_ylim(-2, 102)
    ax.set_ylabel("probability %")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    for i, (a, b) in enumerate(spans):
        bars.broken_barh([(a, max(b - a, 1))], (i % 4, 0.7), color="grey")
    bars.set_yticks([])
    bars.set_ylabel("windows", fontsize=8)
    bars.set_xlabel("frame")
    bars.set_xlim(min(a for a, _ in spans) - 0.5, max(b for _, b in spans) + 0.5)
    fig.savefig(f, format="png", dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m engine.plot",
        description="Training curves (loss, lr, clips/s, data wait, val top-1/top-5) of runs, overlaid.",
    )
    p.add_argument("runs", nargs="+", help="train.py run folders (each with a metrics.jsonl)")
    p.add_argument("--out", help="PNG to write (default: RUN_DIR/curves.png for one run, else curves.png)")
    args = p.parse_args(argv)
    out = args.out or (Path(args.runs[0]) / "curves.png" if len(args.runs) == 1 else "curves.png")
    try:
        print(f"wrote {save_curves(args.runs, out)}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
