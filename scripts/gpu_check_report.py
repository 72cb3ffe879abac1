"""Helpers of scripts/gpu_check.sh: the synthetic-data training speed, and the one summary table.

    python scripts/gpu_check_report.py synthetic OUT.json CONFIG [--a.b=v ...]
    python scripts/gpu_check_report.py table OUTDIR

`synthetic` times forward + backward + SGD step of CONFIG's model on one fixed random batch of
CONFIG's shape (the same amp and channels-last setting as train.py), i.e. the step rate with a loader
that costs nothing: the reference for "speed vs synthetic". `table` reads what gpu_check.sh left in
OUTDIR (profiler JSON files prof_*.json, the training run's metrics.jsonl, synthetic.json and
gpu_mem_mib.txt) and prints one table; it also writes OUTDIR/summary.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic(out: str, config: str, overrides: list[str], steps: int = 12, warmup: int = 3) -> dict:
    import torch
    import torch.nn.functional as F

    from engine.config import load_config
    from models import build_model

    cfg = load_config(config, overrides)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg.model).to(device)
    d = cfg.data
    t = d.num_segments * d.snippet_len if d.sampling != "clip3d" else d.clip_len
    shape = (d.batch_size, t, 3, d.input_size, d.input_size)
    x = torch.randn(shape, device=device)
    if d.layout == "NCTHW":
        x = x.permute(0, 2, 1, 3, 4).contiguous()
    if cfg.train.channels_last:  # as train.py: NTCHW stored as N,T,H,W,C (the 4D fold is channels-last)
        x = (x.contiguous(memory_format=torch.channels_last_3d) if d.layout == "NCTHW"
             else x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3))  # fmt: skip
        model = model.to(memory_format=torch.channels_last)
    y = torch.randint(0, cfg.model.num_classes, (d.batch_size,), device=device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()

    def step() -> None:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        "clips_per_s": steps * d.batch_size / seconds,
        "shape": list(shape),
        "device": device.type,
        "gpu_mem_gib": torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else None,
    }
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def train_summary(metrics: Path) -> dict:
    """clips/s and data-wait share of the training run (log windows after the first, which holds the
    pipeline start, when there are several)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("kind") == "train"]
    if not train:
        raise SystemExit(f"{metrics}: no 'train' log lines (lower train.log_every?)")
    used = train[1:] if len(train) > 1 else train
    return {
        "windows": len(used),
        "clips_per_s": sum(r["clips_per_s"] for r in used) / len(used),
        "data_wait": sum(r["data_wait"] for r in used) / len(used),
    }


def table(outdir: str) -> dict:
    root = Path(outdir)
    console = Console(width=170)
    tab = Table(title=f"gpu_check: {root}")
    columns = ("what", "clips/s", "decoded/kept frame", "CPU-ms/clip", "GPU mem", "data wait", "vs synthetic")
    for col in columns:
        tab.add_column(col, justify="left" if col == "what" else "right")
    summary: dict = {"profiler": [], "train": None, "synthetic": None}
    for path in sorted(root.glob("prof_*.json")):
        doc = json.loads(path.read_text())
        for r in doc["results"]:
            label = f"{path.stem[5:]}: {r['name']}"
            summary["profiler"].append({"set": path.stem[5:], **r})
            if r["error"]:
                tab.add_row(label, "-", "-", "-", "-", "-", f"[red]{r['error'][:60]}[/red]")
                continue
            dec = "-" if r["decoded_per_kept"] is None else f"{r['decoded_per_kept']:.2f}"
            dec += " (c)" if r["decoded_note"] == "computed" else ""
            cpu = f"{r['cpu_ms_per_clip']:.1f}"
            tab.add_row(label, f"{r['clips_per_s']:.1f}", dec, cpu, r["gpu"], "-", "-")
    synth_path = root / "synthetic.json"
    synth = json.loads(synth_path.read_text()) if synth_path.exists() else None
    summary["synthetic"] = synth
    if synth:
        mem = "-" if synth["gpu_mem_gib"] is None else f"{synth['gpu_mem_gib']:.1f} GiB"
        tab.add_row(f"synthetic data, batch {synth['shape']}", f"{synth['clips_per_s']:.1f}", "-", "-", mem,
                    "-", "1.00x")  # fmt: skip
    metrics = root / "train" / "metrics.jsonl"
    if metrics.exists():
        tr = train_summary(metrics)
        mem_file = root / "gpu_mem_mib.txt"
        values = [float(v) for v in mem_file.read_text().split()] if mem_file.exists() else []
        tr["gpu_mem_gib"] = max(values) / 1024 if values else None
        summary["train"] = tr
        mem = "-" if tr["gpu_mem_gib"] is None else f"{tr['gpu_mem_gib']:.1f} GiB (nvidia-smi peak)"
        vs = f"{tr['clips_per_s'] / synth['clips_per_s']:.2f}x" if synth else "-"
        tab.add_row(f"train.py one epoch ({tr['windows']} log windows)", f"{tr['clips_per_s']:.1f}", "-", "-",
                    mem, f"{100 * tr['data_wait']:.1f}%", vs)  # fmt: skip
    console.print(tab)
    console.print("(c) = computed: DALI's video decoder decodes from frame 0 to the highest requested index")
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 3 and argv[0] == "synthetic":
        print(json.dumps(synthetic(argv[1], argv[2], argv[3:])))
        return 0
    if len(argv) == 2 and argv[0] == "table":
        table(argv[1])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
