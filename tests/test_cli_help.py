"""Every command's --help shows the defaults (the formatter skips None and False: unset, flags)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

COMMANDS = [
    ("train", [], "--print-config shows every value with the defaults"),  # config keys: the epilog
    ("evaluate", [], "(default: 10.0)"),  # --progress-every
    ("prep.resize", [], "(default: 320)"),  # --short-side
    ("prep.lists", ["kinetics"], "(default: decode)"),  # --count
    ("prep.validate", [], "(default: "),
    ("prep.synth", [], "(default: "),
    ("prep.audit", [], "(default: 10)"),  # --top
    ("dali_pipes.profile", [], "(default: "),
    ("models.convert", [], "(default: 8)"),  # --num-segments
    ("models.summary", [], "ResNet depth for every model (default 50)"),  # stated in the help: not twice
]


@pytest.mark.parametrize("module, sub, expected", COMMANDS)
def test_help_shows_defaults(module, sub, expected, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as stop:
        main([*sub, "--help"])
    assert stop.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert expected in out, out
    assert "(default: None)" not in out and "(default: False)" not in out and "(default: )" not in out


# Every entry point as a user starts it; --help must answer before torch and DALI load (1-2 s quiet,
# 20-30 s on a loaded machine). engine.launch is torchrun itself (its help is torchrun's) and is left out.
ENTRY_POINTS = [
    ["train.py"], ["evaluate.py"], ["-m", "predict"], ["demo.py"], ["-m", "prep.resize"],
    ["-m", "prep.lists", "kinetics"], ["-m", "prep.validate"], ["-m", "prep.synth"],
    ["-m", "dali_pipes.profile"], ["-m", "models.convert"], ["-m", "models.summary"], ["-m", "engine.config"],
    ["-m", "engine.plot"],
]  # fmt: skip

# Runs the entry point's own __main__ code in this interpreter, then reports which heavy modules loaded.
_PROBE = """
import contextlib, io, json, runpy, sys
target, *rest = sys.argv[1:]
sys.argv = [target, *rest, "--help"]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        if target == "-m":
            sys.argv = sys.argv[1:]
            runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")
        code = None
    except SystemExit as e:
        code = e.code
loaded = [m for m in ("torch", "nvidia.dali") if m in sys.modules]
print(json.dumps({"code": code, "loaded": loaded, "usage": out.getvalue().startswith("usage:")}))
"""


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda e: " ".join(e))
def test_help_loads_neither_torch_nor_dali(entry):
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *entry], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "loaded": [], "usage": True}, (entry, result)
