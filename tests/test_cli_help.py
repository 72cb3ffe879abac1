"""Every command's --help shows the defaults (the formatter skips None and False: unset, flags)."""

from __future__ import annotations

import importlib

import pytest

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
