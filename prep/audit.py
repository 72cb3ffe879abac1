"""Price every video's decode cost before training, from the list's packet index (nothing is decoded).

    python -m prep.audit LIST [--config CFG] [--data.KEY=VALUE ...] [--jobs N]
    python -m prep.audit LIST --expensive-list OUT --above 4      # then prep.resize ... --only OUT
    python -m prep.audit LIST --fingerprint                       # the dataset fingerprint alone

Per video: codec, size, fps and whether the frame rate is variable (VFR), keyframe interval (mean, max),
B-frames (frames shown before an earlier-decoded one), open GOP, bytes, and the expected decoded frames
per kept frame for the config's sampler in train and test mode, for the PyAV route and the trimmed DALI
video decoder (dali_pipes.cost: the same plans the routes decode with). Prints dataset totals, the cost
distribution and the most expensive videos; writes LIST.audit.csv and LIST.audit.png (histogram).
The packet index (LIST.index) is built when missing, by demuxing.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dali_pipes.cost import expected_costs
from dali_pipes.fingerprint import list_fingerprint
from dali_pipes.listfile import Entry, ListFileError, read_list
from dali_pipes.packet_index import PacketIndex, index_path_for
from dali_pipes.sampling import SamplingOptions
from dali_pipes.video_io import DISCARD, KEY, RECOVERY, VideoIndex, VideoReadError
from engine.config import Config, ConfigError, DefaultsHelpFormatter, load_config, split_cli
from engine.fileio import atomic_write, atomic_write_text
from prep.common import UserError, default_jobs, parallel_map, positive_int, run_cli

COST_COLUMNS = ("pyav_train", "pyav_test", "dali_train", "dali_test")


# ---- per video --------------------------------------------------------------------------------


def gop_facts(index: VideoIndex) -> dict:
    """Stream facts that set the decode cost: fps, VFR, keyframe interval, B-frames, open GOP."""
    assert index.packets is not None
    pts = np.asarray(index.pts, np.int64)
    num, den = index.time_base
    steps = np.diff(pts)
    step = float(np.median(steps)) if len(steps) else 0.0
    fps = den / (num * step) if step and num else math.nan
    # variable frame rate: frame durations differ by more than rounding to the time base
    vfr = bool(len(steps) and steps.max() - steps.min() > max(2.0, 0.02 * step))
    intervals = np.diff(np.append(np.asarray(index.keyframes), index.num_frames))
    packets = index.packets[(index.packets["flags"] & DISCARD) == 0]
    p = packets["pts"]
    reordered = int((p[1:] < np.maximum.accumulate(p)[:-1]).sum()) if len(p) > 1 else 0
    return {
        "codec": index.codec, "width": index.width, "height": index.height, "fps": round(fps, 3),
        "vfr": vfr, "frames": index.num_frames,
        "keyint_mean": round(float(intervals.mean()), 2), "keyint_max": int(intervals.max()),
        "b_frames": reordered, "open_gop": open_gop(packets),
    }  # fmt: skip


def open_gop(packets: np.ndarray) -> bool:
    """An I-frame decoding cannot start at (a recovery point, not an IDR/IRAP refresh), or a GOP whose
    leading frames are shown before its keyframe (they reference the previous GOP)."""
    flags = packets["flags"]
    if (flags & RECOVERY).any():
        return True
    group = np.cumsum((flags & KEY) != 0) - 1  # the keyframe each packet follows in decode order
    keys = np.nonzero(flags & KEY)[0]
    if len(keys) == 0:
        return False
    ok = group >= 0
    key_pts = packets["pts"][keys][group[ok]]
    return bool((packets["pts"][ok] < key_pts).any())


@dataclass(frozen=True)
class Job:
    sid: int
    entry: Entry
    index_file: str
    opts: SamplingOptions
    seed: int
    draws: int


_INDEXES: dict[str, PacketIndex] = {}  # per process: the list's index, memory-mapped once


def audit_one(job: Job) -> dict:
    """One row of the audit table (costs nan and `problem` set for a video that cannot be indexed)."""
    e = job.entry
    row: dict = {"line": e.line, "path": e.rel, "label": e.label, "listed_frames": e.num_frames}
    if job.index_file not in _INDEXES:
        _INDEXES[job.index_file] = PacketIndex(job.index_file)
    try:
        row["bytes"] = Path(e.path).stat().st_size
        index = _INDEXES[job.index_file].get(e.path)
    except (OSError, VideoReadError) as err:
        return {**row, "problem": str(err).splitlines()[0], **dict.fromkeys(COST_COLUMNS, math.nan)}
    row.update(gop_facts(index))
    n = min(e.num_frames, index.num_frames)
    for split in ("train", "test"):
        pyav, dali, draws = expected_costs(index, n, split, job.opts, job.seed, job.sid, job.draws)
        row.update({f"pyav_{split}": pyav, f"dali_{split}": dali, f"draws_{split}": draws})
    if math.isnan(row["dali_train"]):
        row["problem"] = "the DALI route cannot trim it (open GOP, codec, or payloads not stored verbatim)"
    if index.num_frames < e.num_frames:  # the loader refuses it: priced on the frames there are
        row["problem"] = f"shorter than listed: {index.num_frames} frames, the list says {e.num_frames}"
    return row


def audit_table(list_path: str, cfg: Config, jobs: int, draws: int = 0, quiet: bool = False) -> pd.DataFrame:
    """The per-video table, in list order."""
    from dali_pipes.loader import sampling_options  # DALI's import: not for --fingerprint

    entries = read_list(list_path, cfg.data.root)
    index = PacketIndex(index_path_for(list_path))
    built = index.update([e.path for e in entries], jobs=jobs)
    if built and not quiet:
        print(f"packet index: {built} entries built ({index.path})")
    opts = sampling_options(cfg.data, cfg.eval)
    work = [Job(sid, e, str(index.path), opts, cfg.data.seed, draws) for sid, e in enumerate(entries)]
    rows = dict(parallel_map(audit_one, work, jobs, "audit", quiet=quiet, unit="videos"))
    table = pd.DataFrame([rows[j] for j in work])
    if "problem" not in table:
        table["problem"] = ""
    table["problem"] = table["problem"].fillna("")
    ints = [c for c in ("bytes", "width", "height", "frames", "keyint_max", "b_frames", "draws_train",
                        "draws_test") if c in table]  # fmt: skip
    flags = [c for c in ("vfr", "open_gop") if c in table]
    return table.astype({**dict.fromkeys(ints, "Int64"), **dict.fromkeys(flags, "boolean")})


# ---- reports ----------------------------------------------------------------------------------


def route_of(cfg: Config) -> str:
    """The route the config trains with: pyav, or dali (DALI's video decoder, NVDEC or CPU)."""
    from dali_pipes.loader import source_kind

    return "pyav" if source_kind(cfg.data) == "pyav" else "dali"


def totals(table: pd.DataFrame, opts: SamplingOptions) -> pd.DataFrame:
    """Dataset totals per route and mode: mean cost (decoded / kept frames over the whole list) and
    decoded frames per epoch; grouped by codec too."""
    ok = table.dropna(subset=["pyav_train"])
    out = []
    for (codec,), group in [(("all",), ok), *ok.groupby(["codec"])]:
        row = {"codec": codec, "videos": len(group), "GB": group["bytes"].sum() / 1e9}
        for col in COST_COLUMNS:
            split = col.split("_")[1]
            kept = opts.frames_per_clip * opts.clips(split)  # every clip keeps the same frame count
            row[col] = group[col].mean()
            row[f"{col}_decoded"] = group[col].sum() * kept
        out.append(row)
    return pd.DataFrame(out)


def print_report(table: pd.DataFrame, cfg: Config, list_path: str, top: int, route: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from dali_pipes.loader import sampling_options

    console = Console(width=160)
    opts = sampling_options(cfg.data, cfg.eval)
    bad = table[table["pyav_train"].isna()]
    t = Table(title=f"{list_path}: {len(table)} videos ({len(bad)} cannot be indexed); expected decoded "
                    f"frames per kept frame, train {cfg.data.sampling} x{opts.frames_per_clip}, test "
                    f"{opts.test_mode} x{opts.clips('test')} clips")  # fmt: skip
    for col in ("codec", "videos", "GB", *COST_COLUMNS, "decoded / epoch (pyav train)"):
        t.add_column(col, justify="left" if col == "codec" else "right")
    for _, r in totals(table, opts).iterrows():
        costs = [f"{r[c]:.2f}" if not math.isnan(r[c]) else "-" for c in COST_COLUMNS]
        decoded = f"{r['pyav_train_decoded']:,.0f}"
        t.add_row(str(r["codec"]), str(r["videos"]), f"{r['GB']:.2f}", *costs, decoded)
    console.print(t)
    cost = table[f"{route}_train"].dropna()
    if len(cost):
        q = cost.quantile([0.5, 0.9, 0.99]).tolist()
        console.print(f"{route} train cost: median {q[0]:.2f}, p90 {q[1]:.2f}, p99 {q[2]:.2f}, "
                      f"max {cost.max():.2f}; open GOP {int(table['open_gop'].sum())}, "
                      f"VFR {int(table['vfr'].sum())}, "
                      f"with B-frames {int((table['b_frames'] > 0).sum())} videos")  # fmt: skip
    worst = table.dropna(subset=[f"{route}_train"]).nlargest(top, f"{route}_train")
    if len(worst):
        w = Table(title=f"the {len(worst)} most expensive videos ({route} route, train)")
        facts = ("line", "path", "codec", "keyint_max", "b_frames", "open_gop")
        for col in (*facts, f"{route}_train", f"{route}_test"):
            w.add_column(col, justify="left" if col in ("path", "codec") else "right")
        for _, r in worst.iterrows():
            costs = [f"{r[f'{route}_{split}']:.2f}" for split in ("train", "test")]
            w.add_row(*(str(r[c]) for c in facts), *costs)
        console.print(w)
    for _, r in bad.iterrows():
        console.print(f"[yellow]{list_path}:{r['line']}: {r['problem']}")


def plot_histogram(table: pd.DataFrame, title: str, f) -> None:
    """Histogram of train-mode cost per route (log-spaced bins: costs run from 1 to hundreds)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.add_subplot()
    values = {r: table[f"{r}_train"].dropna().to_numpy() for r in ("pyav", "dali")}
    top = max((v.max() for v in values.values() if len(v)), default=2.0)
    bins = np.geomspace(1.0, max(top, 2.0) * 1.05, 30)
    for r, v in values.items():
        if len(v):
            ax.hist(v, bins=bins, alpha=0.6, label=f"{r} route ({len(v)} videos)")
    ax.set_xscale("log")
    ax.set_xlabel("expected decoded frames per kept frame (train)")
    ax.set_ylabel("videos")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.savefig(f, format="png", dpi=100)


def write_expensive(table: pd.DataFrame, route: str, above: float, out: str, list_path: str,
                    cfg: Config) -> int:  # fmt: skip
    """OUT: the absolute paths (one a line) of the videos costing more than `above` (prep.resize --only)."""
    entries = {e.line: e.path for e in read_list(list_path, cfg.data.root)}
    chosen = table[table[f"{route}_train"] > above]
    atomic_write_text(out, "".join(f"{Path(entries[int(n)]).resolve()}\n" for n in chosen["line"]))
    return len(chosen)


# ---- command line -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m prep.audit", formatter_class=DefaultsHelpFormatter,
                                description=__doc__.splitlines()[0])  # fmt: skip
    p.add_argument("list", metavar="LIST", help="list file ('path num_frames label' lines)")
    p.add_argument("--config", help="YAML config whose data and eval sections set the sampler")
    p.add_argument("--fingerprint", action="store_true", help="print the dataset fingerprint alone and exit")
    p.add_argument("--route", choices=("pyav", "dali"),
                   help="route that ranks videos (default: the config's)")  # fmt: skip
    p.add_argument("--top", type=positive_int, default=10, help="most expensive videos to print")
    p.add_argument("--expensive-list", metavar="OUT",
                   help="write the paths of the videos costing more than --above")  # fmt: skip
    p.add_argument("--above", type=float, help="cost threshold for --expensive-list (decoded per kept frame)")
    p.add_argument("--draws", type=int, default=0,
                   help="seeded draws per video for the expected cost (0: until within 0.5%%)")  # fmt: skip
    p.add_argument("--jobs", type=positive_int, default=default_jobs(), help="parallel processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    overrides, rest = split_cli(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(rest)
    if (args.expensive_list is None) != (args.above is None):
        raise UserError("--expensive-list OUT and --above X go together")
    try:
        cfg = load_config(args.config, overrides)
        cfg.eval.resolved(cfg.data.sampling)
        if args.fingerprint:
            print(list_fingerprint(args.list, cfg.data, cfg.eval).line())
            return 0
        table = audit_table(args.list, cfg, args.jobs, args.draws, args.quiet)
    except (ConfigError, ListFileError) as e:
        raise UserError(str(e)) from None
    route = args.route or route_of(cfg)
    csv = Path(f"{args.list}.audit.csv")
    atomic_write_text(csv, table.to_csv(index=False, float_format="%.4f"))
    png = Path(f"{args.list}.audit.png")
    atomic_write(png, lambda f: plot_histogram(table, f"{args.list}: decode cost per video", f))
    print_report(table, cfg, args.list, args.top, route)
    print(f"wrote {csv} and {png}")
    if args.expensive_list:
        n = write_expensive(table, route, args.above, args.expensive_list, args.list, cfg)
        print(f"wrote {args.expensive_list}: {n} videos above {args.above:g} ({route} route, train); "
              f"re-encode them with python -m prep.resize SRC DST --only {args.expensive_list}")  # fmt: skip
    return 0


if __name__ == "__main__":
    run_cli(main)
