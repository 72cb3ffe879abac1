"""Helpers of scripts/gpu_check.sh: an environment probe, the synthetic-data training speed, the one table.

    python scripts/gpu_check_report.py probe
    python scripts/gpu_check_report.py synthetic OUT.json CONFIG [--a.b=v ...]
    python scripts/gpu_check_report.py table OUTDIR [--device gpu|cpu] [--budget S]

`probe` prints the Python, torch/CUDA, DALI and PyAV versions and which of the project's Python
dependencies are missing (rc 2 when DALI, PyAV or torch cannot be imported). `synthetic` times forward +
backward + SGD step of CONFIG's model on one fixed random batch of CONFIG's shape (the same amp and
channels-last setting as train.py), i.e. the step rate with a loader that costs nothing: the reference
for "vs synthetic". `table` reads what gpu_check.sh left in OUTDIR (steps.tsv: one line per step with
its rc, seconds, limit, note and artefacts; logs/<step>.log; prof_*.json; nvdec_*.txt; train/metrics.jsonl;
gpu_mem_mib.txt; synthetic.json; nvsmi_fields.txt), prints one table and writes OUTDIR/summary.json. It
needs only the standard library, and a missing or broken artefact becomes "n/a" with the reason, so the
table comes even when steps failed; no figure is ever filled in that was not measured.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import re
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.fileio import atomic_write_text  # noqa: E402  (standard library only)

TAIL_LINES = 5  # log lines kept in summary.json for a step that did not succeed
# Why the number of NVDEC decoder sessions is "n/a": said once, in the table and in summary.json.
NVDEC_SESSIONS_WHY = (
    "not measurable here: NVML / nvidia-smi count encoder sessions (encoder.stats.sessionCount) and FBC "
    "sessions but no decoder sessions, and DALI 2.4 reports none"
)


# ---- probe ---------------------------------------------------------------------------------------


def probe() -> int:
    """Versions of what the GPU route needs, and the project's Python dependencies that are missing."""
    import platform

    print(f"python {platform.python_version()} ({sys.executable})")
    rc = 0
    for name, show in (("torch", _torch_line), ("nvidia.dali", _version), ("av", _version)):
        try:
            print(f"{name}: {show(importlib.import_module(name))}")
        except Exception as e:  # a broken install raises more than ImportError
            print(f"{name}: NOT importable ({type(e).__name__}: {e})")
            rc = 2
    # found, not imported (cheap): an import error of these shows in the step that needs them
    missing = [n for n in ("numpy", "yaml", "rich", "pandas", "matplotlib", "pytest") if not _findable(n)]
    print("project modules missing: " + (", ".join(missing) if missing else "none"))
    return rc


def _findable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _version(module) -> str:
    return str(getattr(module, "__version__", "?"))


def _torch_line(torch) -> str:
    cuda = torch.cuda.is_available()
    gpu = f", {torch.cuda.get_device_name(0)}" if cuda else ""
    return f"{torch.__version__} (CUDA {torch.version.cuda}, available: {cuda}{gpu})"


# ---- synthetic -----------------------------------------------------------------------------------


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
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    return result


# ---- reading the artefacts (each returns figures, or {"why": ...} when there are none) -------------


def train_summary(metrics: Path) -> dict:
    """clips/s and data-wait share of the training run (log windows after the first, which holds the
    pipeline start, when there are several)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("kind") == "train"]
    if not train:
        return {"why": f"{metrics}: no 'train' log lines (lower train.log_every?)"}
    used = train[1:] if len(train) > 1 else train
    return {
        "windows": len(used),
        "clips_per_s": sum(r["clips_per_s"] for r in used) / len(used),
        "data_wait": sum(r["data_wait"] for r in used) / len(used),
    }


def _stamp(text: str) -> float | None:
    """nvidia-smi's timestamp field (local time, "2026/12/05 21:03:04.123") as Unix seconds."""
    try:
        return datetime.strptime(text.strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
    except ValueError:
        return None


def nvdec_utilisation(path: Path, window: tuple[float, float] | None) -> dict:
    """Mean / max of nvidia-smi's utilization.decoder samples ("timestamp, percent" lines, 200 ms apart):
    over the whole step and over the profiler's timed window (when the timestamps line up)."""
    if not path.exists():
        return {"why": "no nvidia-smi on this machine: NVDEC utilisation not sampled"}
    samples, other = [], []
    for line in path.read_text(errors="replace").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and re.fullmatch(r"\d+(\.\d+)?", parts[1]):
            samples.append((_stamp(parts[0]), float(parts[1])))
        elif line.strip():
            other.append(line.strip())
    if not samples:
        first = other[0][:120] if other else "empty file"
        return {"why": f"nvidia-smi gave no utilization.decoder numbers ({first})"}
    values = [v for _, v in samples]
    out = {"mean": sum(values) / len(values), "max": max(values), "samples": len(values)}
    if window:
        inside = [v for t, v in samples if t is not None and window[0] <= t <= window[1]]
        if inside:
            out.update(window_mean=sum(inside) / len(inside), window_max=max(inside),
                       window_samples=len(inside))
    return out


def gpu_memory_peak(path: Path) -> dict:
    if not path.exists():
        return {"why": "no nvidia-smi on this machine: GPU memory not sampled"}
    values = [float(v) for v in path.read_text(errors="replace").split() if re.fullmatch(r"\d+(\.\d+)?", v)]
    if not values:
        return {"why": f"nvidia-smi gave no memory.used numbers ({path.name})"}
    return {"gpu_mem_gib": max(values) / 1024, "samples": len(values)}


def profiler_figures(root: Path, files: list[str]) -> tuple[dict, list[dict]]:
    """The route's figures from prof_*.json, with NVDEC utilisation from the matching nvdec_*.txt."""
    prof = next((f for f in files if f.startswith("prof_")), None)
    nvdec = next((f for f in files if f.startswith("nvdec_")), None)
    if prof is None or not (root / prof).exists():
        return {"why": f"no profiler results ({prof or 'no file named'})"}, []
    try:
        doc = json.loads((root / prof).read_text())
        results = doc["results"]
    except (ValueError, KeyError) as e:
        return {"why": f"{prof}: unreadable ({e})"}, []
    rows = [{"set": prof[len("prof_") : -len(".json")], **r} for r in results]
    route = next((r for r in results if r.get("kind") == "route"), None)
    if route is None:
        return {"why": f"{prof}: no route result"}, rows
    if route.get("error"):
        return {"why": f"route failed: {route['error']}"}, rows
    start = route.get("started_at") or 0.0
    window = (start, start + route["seconds"]) if start else None
    figures = {k: route.get(k) for k in ("name", "clips_per_s", "decoded_per_kept", "decoded_note",
                                          "cpu_ms_per_clip", "gpu", "seconds", "clips")}  # fmt: skip
    figures["nvdec_util"] = nvdec_utilisation(root / nvdec, window) if nvdec else {"why": "not sampled"}
    figures["nvdec_sessions"] = {"value": None, "why": NVDEC_SESSIONS_WHY}
    return figures, rows


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {"why": f"{path.name} not written"}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        return {"why": f"{path.name}: unreadable ({e})"}


def probe_figures(log: str) -> dict:
    """NVDEC capability lines of the kit's probe (`NVDEC H.264 rc=0 supported=1 engines=.. min=WxH ...`)."""
    caps = {}
    pattern = r"^NVDEC (\S+)\s+rc=(-?\d+) supported=(\d+) engines=(\d+) min=(\d+x\d+) max=(\d+x\d+)"
    for m in re.finditer(pattern, log, re.M):
        caps[m[1]] = {"rc": int(m[2]), "supported": m[3] == "1", "engines": int(m[4]), "min": m[5],
                      "max": m[6]}  # fmt: skip
    figures: dict = {"nvdec_caps": caps} if caps else {}
    own = {"dali": r"^nvidia\.dali: (.+)$", "torch": r"^torch: (.+)$", "pyav": r"^av: (.+)$",
           "missing": r"^project modules missing: (.+)$"}  # the lines of gpu_check_report.py probe
    for key, pattern in own.items():
        found = re.search(pattern, log, re.M)
        if found:
            figures[key] = found[1].strip()
    gpu = re.search(r"^== machine\n(.+)$", log, re.M)
    if gpu:
        figures["gpu"] = gpu[1].strip()
    if "GPUKIT: NO-GO" in log:
        figures["go"] = False
    elif "GPUKIT: GO" in log:
        figures["go"] = True
    return figures


def tests_figures(log: str) -> dict:
    """pytest's last summary line and the FAILED / ERROR lines."""
    counts = re.compile(r"\d+ (passed|failed|skipped|error|deselected)")
    summary = [ln for ln in log.splitlines() if counts.search(ln)]
    bad = [ln.strip()[:200] for ln in log.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    return {"pytest": summary[-1].strip("= ") if summary else None, "failed": bad}


# ---- the table -----------------------------------------------------------------------------------


def read_steps(root: Path) -> list[dict]:
    """steps.tsv: id, rc (integer or "skipped"), seconds, limit, note, artefacts (comma-separated)."""
    steps = []
    path = root / "steps.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        parts = (line.split("\t") + [""] * 6)[:6]
        sid, rc, seconds, limit, note, files = parts
        rc_value = int(rc) if re.fullmatch(r"-?\d+", rc) else None
        status = ("ok" if rc_value == 0 else "timed out" if rc_value in (124, 137) else
                  "skipped" if rc_value is None else "failed")  # fmt: skip
        steps.append({"step": sid, "rc": rc_value, "status": status, "seconds": _float(seconds),
                      "limit_s": _float(limit), "note": note,
                      "files": [f for f in files.split(",") if f]})  # fmt: skip
    return steps


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _log(root: Path, step: str) -> str:
    path = root / "logs" / f"{step}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def collect(root: Path, device: str, budget: float | None) -> dict:
    """summary.json's content: every step with its rc, seconds and figures (or why there are none)."""
    steps = read_steps(root)
    summary: dict = {"device": device, "budget_s": budget, "steps": steps, "profiler": [], "train": None,
                     "synthetic": None,
                     "nvdec_sessions": {"value": None, "why": NVDEC_SESSIONS_WHY}}  # fmt: skip
    synth = _read_json(root / "synthetic.json")
    summary["synthetic"] = None if "why" in synth else synth
    for s in steps:
        log = _log(root, s["step"])
        if s["status"] not in ("ok", "skipped"):
            s["tail"] = [ln[:300] for ln in log.splitlines() if ln.strip()][-TAIL_LINES:]
        if s["step"] == "probe":
            s["figures"] = probe_figures(log)
        elif s["step"] == "tests":
            s["figures"] = tests_figures(log) if s["status"] != "skipped" else {}
        elif s["step"].startswith("prof-"):
            s["figures"], rows = profiler_figures(root, s["files"])
            summary["profiler"] += rows
        elif s["step"] == "train":
            metrics = root / "train" / "metrics.jsonl"
            tr = train_summary(metrics) if metrics.exists() else {"why": "train/metrics.jsonl not written"}
            if "why" not in tr:
                mem = gpu_memory_peak(root / "gpu_mem_mib.txt")
                tr["gpu_mem_gib"] = mem.get("gpu_mem_gib")
                if "why" in mem:
                    tr["gpu_mem_why"] = mem["why"]
            if "why" not in tr and summary["synthetic"]:
                tr["vs_synthetic"] = tr["clips_per_s"] / summary["synthetic"]["clips_per_s"]
            s["figures"] = tr
            summary["train"] = None if "why" in tr and "clips_per_s" not in tr else tr
        elif s["step"] == "synthetic":
            s["figures"] = synth
        else:
            s["figures"] = {}
    fields = root / "nvsmi_fields.txt"
    if fields.exists():  # what this driver's nvidia-smi offers about the decoder (proves the n/a above)
        text = fields.read_text(errors="replace")
        summary["nvsmi_decoder_fields"] = sorted(set(re.findall(r'"([a-z_.]*dec[a-z_.]*)"', text)))
    summary["failed"] = [s["step"] for s in steps if s["status"] in ("failed", "timed out")
                         or (s["status"] == "skipped" and "budget" in s["note"])]  # fmt: skip
    summary["total_s"] = sum(s["seconds"] or 0 for s in steps)
    return summary


def _fmt(value, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def row_cells(s: dict) -> list[str]:
    """step | rc | s | clips/s | decoded/kept | CPU-ms/clip | NVDEC % mean/max | NVDEC sessions | GPU mem |
    data wait | vs synthetic | note"""
    f = s.get("figures") or {}
    rc = "skip" if s["rc"] is None else str(s["rc"])
    cells = [s["step"], rc, _fmt(s["seconds"]), "-", "-", "-", "-", "-", "-", "-", "-"]
    note = s["note"]
    if s["step"].startswith("prof-") and "why" not in f:
        dec = _fmt(f["decoded_per_kept"], ".2f") + (" (c)" if f["decoded_note"] == "computed" else "")
        util = f["nvdec_util"]
        if "why" in util:
            nv = "n/a"
            note = note or util["why"]
        elif "window_mean" in util:
            nv = f"{util['window_mean']:.0f}/{util['window_max']:.0f} (t)"
        else:
            nv = f"{util['mean']:.0f}/{util['max']:.0f} (all)"
        cells[3:9] = [_fmt(f["clips_per_s"]), dec, _fmt(f["cpu_ms_per_clip"]), nv, "n/a (1)", f["gpu"]]
    elif s["step"] == "train" and "clips_per_s" in f:
        mem = _fmt(f.get("gpu_mem_gib"), ".1f", " GiB")
        cells[3] = _fmt(f["clips_per_s"])
        cells[8:11] = [mem, _fmt(100 * f["data_wait"], ".1f", "%"), _fmt(f.get("vs_synthetic"), ".2f", "x")]
    elif s["step"] == "synthetic" and "clips_per_s" in f:
        cells[3], cells[10] = _fmt(f["clips_per_s"]), "1.00x"
        cells[8] = _fmt(f.get("gpu_mem_gib"), ".1f", " GiB")
    elif s["step"] == "probe" and f.get("nvdec_caps"):
        note = note or "NVDEC min " + ", ".join(f"{k} {v['min']}" for k, v in f["nvdec_caps"].items())
    elif s["step"] == "probe" and f.get("dali"):
        note = note or f"DALI {f['dali']}; modules missing: {f.get('missing', '?')}"
    elif s["step"] == "tests" and f.get("pytest"):
        note = f["pytest"]
    if s["status"] not in ("ok", "skipped") or (s["status"] == "skipped" and not note):
        last = (s.get("tail") or [""])[-1]
        note = f"{s['status'].upper()}: {last}" if last else s["status"].upper()
    elif "why" in f and s["status"] == "ok":
        note = f"n/a: {f['why']}"
    return [*cells, note[:90]]


def render(summary: dict, root: Path) -> str:
    head = ["step", "rc", "s", "clips/s", "decoded/kept", "CPU-ms/clip", "NVDEC % mean/max", "NVDEC sessions",
            "GPU mem", "data wait", "vs synthetic", "note"]  # fmt: skip
    rows = [head] + [row_cells(s) for s in summary["steps"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return " | ".join(c.ljust(w) if i in (0, len(head) - 1) else c.rjust(w)
                          for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()  # fmt: skip

    rule = "-+-".join("-" * w for w in widths)
    out = [f"gpu_check: {root} (device {summary['device']})", line(head), rule, *map(line, rows[1:]), rule]
    failed = summary["failed"]
    n = len(summary["steps"])
    not_ok = f"; not ok: {', '.join(failed)}" if failed else ""
    budget = _fmt(summary["budget_s"], ".0f")
    spent = f"{summary['total_s']:.0f} s in steps (budget {budget} s)"
    out.append(f"{n - len(failed)} of {n} steps ok{not_ok}; {spent}")
    out.append("(c) computed: DALI's video decoder decodes from frame 0 to the highest requested index. "
               "NVDEC %: nvidia-smi utilization.decoder every 200 ms, (t) in the profiler's timed window, "
               "(all) over the whole step.")  # fmt: skip
    fields = summary.get("nvsmi_decoder_fields")
    offered = "" if fields is None else f" (this nvidia-smi's decoder fields: {', '.join(fields) or 'none'})"
    out.append(f"(1) NVDEC decoder sessions: {NVDEC_SESSIONS_WHY}{offered}.")
    return "\n".join(out)


def table(outdir: str, device: str = "gpu", budget: float | None = None) -> dict:
    root = Path(outdir)
    summary = collect(root, device, budget)
    print(render(summary, root))
    atomic_write_text(root / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["probe"] and len(argv) == 1:
        return probe()
    if len(argv) >= 3 and argv[0] == "synthetic":
        print(json.dumps(synthetic(argv[1], argv[2], argv[3:])))
        return 0
    if argv[:1] == ["table"]:
        p = argparse.ArgumentParser(prog="gpu_check_report.py table")
        p.add_argument("outdir")
        p.add_argument("--device", default="gpu")
        p.add_argument("--budget", type=float, default=None)
        args = p.parse_args(argv[1:])
        table(args.outdir, args.device, args.budget)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
