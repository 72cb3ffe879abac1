"""The learning proof under every seed and perturbed numerics: the table in docs/TRAINING.md.

    python scripts/learning_proof_table.py [--data data/demo] [--seeds 0-4] [--variants default,...]
                                           [--out runs/proof_table] [--json FILE]

Each row runs the demo (demo.run_demo: the TSM and the same-size TSN of configs/demo.yaml, trained and
scored on the val list) with `train.seed = data.seed = SEED` under one numerics variant:
  default     oneDNN convolutions on, 1 torch thread, float32 matmul precision "highest"
  no-mkldnn   torch.backends.mkldnn off (PyTorch's own CPU convolution kernels)
  threads2    2 torch threads (another reduction order in every kernel); the two trainings then run
              one after the other (two 2-thread trainings on 2 cores spin in OpenMP barriers)
  medium      torch.set_float32_matmul_precision("medium") (bf16 matmuls where the CPU has them)
and prints one markdown row per run as it finishes, then the verdict against the learning-proof test's
thresholds (tests/test_train_demo.py) and the smallest margin to them.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo import Numerics, run_demo  # noqa: E402
from engine.fileio import atomic_write_text  # noqa: E402

VARIANTS = {
    "default": ([], Numerics()),
    "no-mkldnn": ([], Numerics(mkldnn=False)),
    "threads2": (["train.threads=2"], Numerics()),
    "medium": ([], Numerics(matmul_precision="medium")),
}
# the learning-proof test's thresholds (tests/test_train_demo.py)
TSM_MIN, TSN_TOP1_MAX, TSN_DIR = 90.0, 50.0, (30.0, 70.0)


def margin(tsm: dict, tsn: dict) -> float:
    """Smallest distance (points) of the four figures from the test's thresholds; < 0 = the test fails."""
    return min(tsm["top1"] - TSM_MIN, tsm["direction"] - TSM_MIN, TSN_TOP1_MAX - tsn["top1"],
               tsn["direction"] - TSN_DIR[0], TSN_DIR[1] - tsn["direction"])  # fmt: skip


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        named = (line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
        return next(named)
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def parse_seeds(text: str) -> list[int]:
    a, _, b = text.partition("-")
    return list(range(int(a), int(b) + 1)) if b else [int(s) for s in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/demo"))
    p.add_argument("--seeds", default="0-4", help="0-4 or 0,2,3")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"of {','.join(VARIANTS)}")
    p.add_argument("--out", type=Path, default=Path("runs/proof_table"))
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--by-seed", action="store_true", help="all variants of a seed, then the next seed")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {','.join(unknown)}")
    print(f"machine: {cpu_model()}; demo data {args.data}")
    print("| seed | numerics | TSM top-1 | TSM direction | TSN top-1 | TSN direction | margin | wall s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    order = [(s, v) for v in variants for s in parse_seeds(args.seeds)]
    if args.by_seed:
        order.sort(key=lambda sv: sv[0])
    for seed, name in order:
        extra, numerics = VARIANTS[name]
        start = time.perf_counter()
        tsm, tsn = run_demo(args.data, args.out / f"seed{seed}-{name}",
                            [f"train.seed={seed}", f"data.seed={seed}", "train.eval_every=0", *extra],
                            numerics, parallel=name != "threads2")  # fmt: skip
        row = {"seed": seed, "numerics": name, "tsm_top1": tsm["top1"], "tsm_direction": tsm["direction"],
               "tsn_top1": tsn["top1"], "tsn_direction": tsn["direction"], "margin": margin(tsm, tsn),
               "wall_s": time.perf_counter() - start}  # fmt: skip
        rows.append(row)
        figures = [row[k] for k in ("tsm_top1", "tsm_direction", "tsn_top1", "tsn_direction", "margin")]
        cells = " | ".join(f"{f:.1f}" for f in figures)
        print(f"| {seed} | {name} | {cells} | {row['wall_s']:.0f} |", flush=True)
    worst = min(r["margin"] for r in rows)
    verdict = "holds" if worst >= 3 else "TOO SMALL"
    print(f"smallest margin to the test's thresholds: {worst:.1f} points ({verdict})")
    if args.json:
        atomic_write_text(args.json, json.dumps({"machine": cpu_model(), "rows": rows}, indent=1) + "\n")
    return 0 if worst >= 0 else 1


if __name__ == "__main__":
    sys.exit(main())
