"""`make demo`: the learning proof on the synthetic motion dataset, on CPU in a few minutes.

    python -m demo [--data data/demo] [--out runs/demo/<time>] [--epochs N]

Trains a debug-size TSM and a TSN of exactly the same size (TSN = the same ResNet without the temporal
shift) with configs/demo.yaml through train.train, then scores both final checkpoints on the validation
list with engine.scoring.evaluate_model (the code behind evaluate.py). Every demo class has a time-
reversed twin (move_left/move_right, grow/shrink, ...) whose frames have the same distribution, so a
frame-order-blind TSN cannot beat chance within a pair, while TSM, which exchanges features between
neighbouring frames, can. Printed: top-1 over all classes, the accuracy of telling each clip's class
from its reverse twin ("direction"), training time, and the run directory.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.lifetime import pool_options

CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def reverse_pairs(classes_file: Path) -> list[tuple[int, int]]:
    """Label pairs (class, its time reverse) among the dataset's classes (prep.synth's REVERSE_OF)."""
    from prep.synth import REVERSE_OF

    names = classes_file.read_text().split()
    index = {n: i for i, n in enumerate(names)}
    return [(index[a], index[b]) for a, b in REVERSE_OF.items() if a in index and b in index]


def direction_accuracy(scores: np.ndarray, labels: np.ndarray, pairs: list[tuple[int, int]]) -> float:
    """% of clips of paired classes whose score is higher for their class than for its reverse twin."""
    twin = {a: b for a, b in pairs} | {b: a for a, b in pairs}
    hits = [scores[i, y] > scores[i, twin[y]] for i, y in enumerate(labels.tolist()) if y in twin]
    return 100.0 * float(np.mean(hits)) if hits else float("nan")


@dataclass(frozen=True)
class Numerics:
    """Floating-point kernel choices that change the trained weights but must not change the proof's
    verdict (docs/TRAINING.md's table runs the proof under each); torch threads are `train.threads`."""

    mkldnn: bool = True  # oneDNN convolutions (off: PyTorch's own CPU kernels)
    matmul_precision: str = "highest"  # torch.set_float32_matmul_precision

    def apply(self) -> None:
        import torch

        torch.backends.mkldnn.enabled = self.mkldnn
        torch.set_float32_matmul_precision(self.matmul_precision)


def train_and_score(name: str, data: Path, out_dir: Path, overrides: list[str],
                    numerics: Numerics | None = None) -> dict:  # fmt: skip
    """Train `name` with configs/demo.yaml on `data`; score its final checkpoint on the val list."""
    import train
    from dali_pipes.loader import build_loader
    from engine.checkpoint import load_checkpoint
    from engine.config import load_config
    from engine.scoring import evaluate_model
    from models import build_model

    cfg = load_config(
        CONFIG,
        [
            f"model.name={name}",
            f"data.train_list={data / 'train.txt'}",
            f"data.val_list={data / 'val.txt'}",
            f"data.flip_pairs={data / 'flip_pairs.txt'}",
            f"train.out_dir={out_dir}",
            *overrides,
        ],
    )
    (numerics or Numerics()).apply()
    start = time.perf_counter()
    summary = train.train(cfg)
    seconds = time.perf_counter() - start
    model = build_model(cfg.model)
    model.load_state_dict(load_checkpoint(summary["checkpoint"])["model"])
    loader = build_loader(cfg.data, "val")
    res = evaluate_model(model, loader, cfg.model.num_classes, fuse=cfg.eval.fuse, amp=cfg.train.amp,
                         channels_last=cfg.train.channels_last)  # fmt: skip
    loader.close()
    pairs = reverse_pairs(data / "classes.txt")
    return {
        "name": name,
        "top1": float(res.metrics["top1"]),
        "direction": direction_accuracy(res.scores, res.labels, pairs),
        "videos": int(res.metrics["videos"]),
        "train_seconds": seconds,
        "out_dir": summary["out_dir"],
        "checkpoint": summary["checkpoint"],
    }


class _Prefixed(io.TextIOBase):
    """A text stream that starts every line with `prefix` (the two trainings' logs interleave)."""

    def __init__(self, stream: io.TextIOBase, prefix: str) -> None:
        self.stream, self.prefix, self.at_start = stream, prefix, True

    def write(self, text: str) -> int:
        parts = []
        for line in text.splitlines(keepends=True):
            parts.append(self.prefix + line if self.at_start else line)
            self.at_start = line.endswith("\n")
        self.stream.write("".join(parts))
        self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _train_and_score_in_child(name: str, data: Path, out_dir: Path, overrides: list[str],
                              numerics: Numerics | None = None) -> dict:  # fmt: skip
    """train_and_score in a worker process, its log lines marked with the model's name."""
    sys.stderr = _Prefixed(sys.stderr, f"[{name}] ")
    return train_and_score(name, data, out_dir, overrides, numerics)


def run_demo(data: Path, out_root: Path, overrides: list[str] | None = None,
             numerics: Numerics | None = None, parallel: bool = True) -> list[dict]:  # fmt: skip
    """TSM and TSN, same config and seed; returns both results (TSM first).

    Each training uses one CPU thread (train.threads, one DALI worker), so on a machine with two or more
    cores the two run at once in two spawned processes, which nearly halves the demo's wall time; the
    results are the same as one after the other (every random choice is seeded per run)."""
    names, overrides = ("tsm", "tsn"), list(overrides or [])
    if not parallel or len(os.sched_getaffinity(0)) < 2:  # (parallel=False: trainings of 2+ threads each)
        return [train_and_score(name, data, out_root / name, overrides, numerics) for name in names]
    spawn = multiprocessing.get_context("spawn")  # no fork of a process that has started threads
    # the trainings die with this process, however it ends (a time limit's SIGKILL too: engine.lifetime);
    # Ctrl-C reaches them too and stops each at its next step with a checkpoint (train.py's StopRequest)
    with ProcessPoolExecutor(max_workers=2, mp_context=spawn, **pool_options(ignore_sigint=False)) as pool:
        runs = [pool.submit(_train_and_score_in_child, n, data, out_root / n, overrides, numerics)
                for n in names]  # fmt: skip
        return [run.result() for run in runs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/demo"), help="python -m prep.synth output")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default runs/demo/<time>)")
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs of demo.yaml")
    args = parser.parse_args(argv)
    if not (args.data / "synth.json").is_file():
        hint = f"run `make demo-data` (python -m prep.synth {args.data})"
        print(f"error: {args.data} is not a complete demo dataset; {hint}", file=sys.stderr)
        return 2
    out_root = args.out or Path("runs/demo") / time.strftime("%Y%m%d-%H%M%S")
    overrides = [f"train.epochs={args.epochs}"] if args.epochs else []
    try:
        results = run_demo(args.data, out_root, overrides)
    except KeyboardInterrupt:  # the trainings got the Ctrl-C too: each stopped at its next step
        print(f"interrupted: the trainings stopped with a checkpoint each in {out_root}", file=sys.stderr)
        return 130
    n = len(reverse_pairs(args.data / "classes.txt"))
    print()
    chance = 100.0 / len((args.data / "classes.txt").read_text().split())
    print(f"Learning proof on {args.data} ({results[0]['videos']} validation clips, {n} reverse-twin pairs; "
          f"chance: {chance:.1f} % top-1, 50 % direction)")  # fmt: skip
    print(f"{'model':<6} {'val top-1':>10} {'direction':>10} {'train time':>11}")
    for r in results:
        print(
            f"{r['name'].upper():<6} {r['top1']:>9.1f}% {r['direction']:>9.1f}% {r['train_seconds']:>10.0f}s"
        )
    print(f"run directory: {out_root.resolve()}  (checkpoints, metrics.jsonl, config.yaml per model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
