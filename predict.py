"""Top-k labels for videos that are in no list: the inference command.

    python -m predict runs/demo/<time>/tsm data/demo/val/grow/grow_0000.webm
    python -m predict tsm_k400.pt ~/clips/ --views 3x10 --topk 5 --out preds.csv
    python -m predict converted.pt videos.txt --config configs/tsm_k400.yaml --classes classes.txt

CHECKPOINT is a train.py checkpoint (or a run folder: its ckpt_best.pt, else its newest checkpoint; the
file loaded is printed and written in --out), which brings its config; a
models.convert output has none, so --config names one. The videos (a file, a folder searched
recursively, or a list file with one video per line) go through the test pipeline of the config
(data.device gpu: NVDEC; cpu, or no GPU here: the PyAV route) with frame counts probed here, and
engine.scoring.evaluate_model, the code behind evaluate.py. Class names: --classes, else classes.txt in
the training data's folder, else class indices. A file that cannot be read is reported and skipped;
the exit status is 0 when any video was scored, 2 when none (or on a usage error).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from engine.config import exit_if_help


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m predict",
        description="Top-k labels with probabilities for videos (a file, a folder or a list file).",
        epilog="Dotted overrides such as --data.device=cpu or --eval.fuse=softmax apply after the config.",
    )
    p.add_argument(
        "checkpoint",
        help="train.py checkpoint, a run folder (its ckpt_best.pt, else its newest), or a models.convert "
        "output",
    )
    p.add_argument(
        "target", help="a video, a folder of videos (recursive), or a list file (one video a line)"
    )
    p.add_argument(
        "--config", help="YAML config (required for a models.convert output; default: the stored one)"
    )
    p.add_argument("--views", help="CROPSxCLIPS, e.g. 1x1, 3x10 (default: the config's eval section)")
    p.add_argument("--topk", type=int, default=5, help="labels shown and written per video (default: 5)")
    p.add_argument("--out", help="predictions file, .csv (a row per video and rank) or .json")
    p.add_argument(
        "--classes", default="", help="class names, line i = class i (default: the data's classes.txt)"
    )
    p.add_argument(
        "--root", help="folder a list file's relative paths start from (default: the list's folder)"
    )
    p.add_argument("--amp", choices=("bf16", "fp16", "fp32"), help="autocast dtype (default: train.amp)")
    p.add_argument(
        "--timeline", metavar="PNG",
        help="one long video over time: sliding windows, their top-k (printed; --out: a row per window) and "
        "this picture of class probability over time",
    )  # fmt: skip
    p.add_argument("--render", metavar="OUT.mp4",
                   help="--timeline: also the video with each frame's top-k labels drawn on it (ffmpeg)")
    p.add_argument("--window", type=int, default=64, help="--timeline: frames per window")
    p.add_argument("--stride", type=int, default=0, help="--timeline: frames between window starts (default: "
                   "half a window)")  # fmt: skip
    p.add_argument(
        "--weights",
        default="model",
        choices=("model", "ema"),
        help="which weights of the checkpoint (default: model)",
    )
    return p


if __name__ == "__main__":
    exit_if_help(build_parser)  # before torch and DALI load

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dali_pipes.fingerprint import describe
from engine import inference
from engine.checkpoint import CheckpointError, load_checkpoint, run_checkpoint
from engine.config import Config, ConfigError, parse_views, split_cli
from engine.inference import (
    OUT_FORMATS,
    VideoResult,
    collect_videos,
    probe_frames,
    score_videos,
    top_k,
    write_predictions,
)
from engine.reports import read_class_names

log = logging.getLogger("predict")


def resolve_config(args: argparse.Namespace, ckpt: dict, overrides: list[str]) -> Config:
    """--config when given, else the checkpoint's stored training config; --views and overrides apply."""
    if args.views:
        crops, clips = parse_views(args.views)
        overrides = [*overrides, f"--eval.spatial_crops={crops}", f"--eval.temporal_clips={clips}"]
    return inference.resolve_config(args.checkpoint, ckpt, args.config, overrides)


def probe_all(paths: list[Path], console: Console) -> list[VideoResult]:
    """Frame counts of every video; an unusable one is reported now and kept as an error result."""
    results = []
    for path in paths:
        try:
            frames, note = probe_frames(path)
            results.append(VideoResult(str(path), frames, note=note))
            if note:
                console.print(f"[yellow]warning[/yellow]: {escape(f'{path}: {note}')}")
        except ValueError as e:
            results.append(VideoResult(str(path), error=str(e)))
            console.print(f"[red]skipped[/red] {escape(f'{path}: {e}')}")
    return results


def show(result: VideoResult, console: Console) -> None:
    note = f"  note: {result.note}" if result.note else ""
    console.print(f"{result.path} ({result.frames} frames){note}", markup=False, style="bold")
    table = Table()
    table.add_column("#", justify="right")
    table.add_column("class", overflow="fold")
    table.add_column("probability", justify="right")
    for rank, (c, name, p) in enumerate(result.topk, start=1):
        label = name if name == str(c) else f"{name} ({c})"
        table.add_row(str(rank), label, f"{100 * p:.2f}%")
    console.print(table)


def predict(args: argparse.Namespace, overrides: list[str]) -> int:
    console = Console(highlight=False, soft_wrap=True)  # lines stay whole in log files
    if args.out and Path(args.out).suffix.lower() not in OUT_FORMATS:
        raise ConfigError(f"--out: {args.out} must end in {' or '.join(OUT_FORMATS)}")
    if args.topk < 1:
        raise ConfigError(f"--topk: must be >= 1, got {args.topk}")
    if args.render and not args.timeline:
        raise ConfigError("--render goes with --timeline PNG (the labels come from its windows)")
    if args.timeline:  # one video, windows over time (engine.inference.timeline_command)
        if not Path(args.target).is_file():
            raise ConfigError(f"--timeline: {args.target} must be one video file")
        p = inference.Predictor(args.checkpoint, args.config, overrides, None, args.topk, args.classes,
                                args.weights, args.amp, say=lambda text: console.print(text, markup=False))
        stride = args.stride or max(1, args.window // 2)
        inference.timeline_command(p, args.target, args.window, stride, args.timeline, args.out,
                                   lambda text: console.print(text, markup=False), args.render)  # fmt: skip
        return 0
    paths = collect_videos(args.target, args.root)  # before the model: a wrong path fails fast
    path, why = run_checkpoint(args.checkpoint)
    args.checkpoint = str(path)
    console.print(f"checkpoint {path} ({why})", markup=False)
    ckpt = load_checkpoint(path)
    cfg = resolve_config(args, ckpt, overrides)
    cfg, device, device_id = inference.pick_device(cfg, console.print)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    views = cfg.eval.resolved(cfg.data.sampling)
    names = read_class_names(cfg.model.num_classes, args.classes, cfg)
    amp = args.amp or cfg.train.amp

    model = inference.inference_model(cfg, ckpt, args.checkpoint, args.weights, device)
    trained_on = ckpt.get("dataset", {})  # train.py's dataset fingerprints (none in a converted checkpoint)
    del ckpt

    results = probe_all(paths, console)
    todo = [r for r in results if not r.error]
    if todo:
        view_name = f"{views.spatial_crops}x{views.temporal_clips}"
        source = f"from {args.classes or 'classes.txt'}" if names else "as indices"
        console.print(
            f"scoring {len(todo)} video(s): {cfg.model.name} on {device.type}, views {view_name} "
            f"{views.temporal_mode} ({views.fuse}), class names {source}"
        )
        done = [0]

        def progress(ids: list[int]) -> None:  # one line per scored video (batches finish together)
            for i in ids:
                done[0] += 1
                console.print(f"[{done[0]}/{len(todo)}] {todo[i].path}", markup=False)

        try:
            probs = score_videos(
                model, cfg, [(Path(r.path), r.frames) for r in todo], views, amp, device_id, progress
            )
        except (RuntimeError, ValueError) as e:  # every remaining video failed in the loader
            probs = {}
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            console.print(f"[red]scoring failed[/red]: {escape(first)}")
        for i, r in enumerate(todo):
            if i in probs:
                r.topk = top_k(probs[i], names, args.topk)
            else:
                r.error = "could not be decoded by the test pipeline (see the warning above)"
                console.print(f"[red]skipped[/red] {escape(f'{r.path}: {r.error}')}")
    for r in results:
        if not r.error:
            show(r, console)
    scored = sum(1 for r in results if not r.error)
    console.print(
        f"{scored} of {len(results)} video(s) scored"
        + (f", {len(results) - scored} skipped" if scored < len(results) else "")
    )
    for name, fp in trained_on.items():
        console.print(f"model {describe(name, fp)}", markup=False)
    if args.out:
        meta = {
            "checkpoint": str(args.checkpoint), "model": cfg.model.name,
            "views": f"{views.spatial_crops}x{views.temporal_clips}", "temporal_mode": views.temporal_mode,
            "fuse": views.fuse, "amp": amp, "device": device.type, "dataset": trained_on,
        }  # fmt: skip
        console.print(f"wrote {write_predictions(args.out, results, meta)}")
    return 0 if scored else 2


def main(argv: list[str] | None = None) -> int:
    overrides, rest = split_cli(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(rest)
    try:
        return predict(args, overrides)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:  # ValueError: --timeline's
        # one video unreadable (prep.probe, the test loader)
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
