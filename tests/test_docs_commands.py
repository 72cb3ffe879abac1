"""The train.py / evaluate.py / predict commands in README.md and docs/*.md are a checked list: each one's
options parse with the command's own parser, its dotted overrides name real config keys with valid values,
and the config file it names exists. (Running them needs the data and runs they name; the demo ones run
in `make demo`.) A usage synopsis (`CONFIG`, `[--views ...]`, `A|B`) is not a command and is skipped."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import evaluate
import predict
import train
from engine.config import load_config, split_cli

REPO = Path(__file__).resolve().parents[1]
PARSERS = {
    "train.py": train.build_parser, "evaluate.py": evaluate.build_parser, "predict": predict.build_parser,
}  # fmt: skip
COMMAND = re.compile(r"^(?:python (?:-m )?|torchrun (?:--\S+ )*)(train\.py|evaluate\.py|predict)\b(.*)$")


def doc_commands() -> list[tuple[str, str, str]]:
    """(file:line, program, arguments) of every command in a fenced block, continuation lines joined."""
    found = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        fenced, pending, start = False, "", 0
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            if line.startswith("```"):
                fenced = not fenced
                continue
            if not fenced:
                continue
            text = line.split("  #", 1)[0].strip() if not pending else pending + " " + line.strip()
            start = start if pending else n
            if text.endswith("\\"):
                pending = text[:-1].strip()
                continue
            pending = ""
            m = COMMAND.match(text.split(" # ", 1)[0].strip())
            if m:
                found.append((f"{doc.name}:{start}", m.group(1), m.group(2)))
    return found


def is_synopsis(args: str) -> bool:
    return bool(re.search(r"\[|\||\b[A-Z]{3,}\b", args.replace("$(", "")))


CHECKED = [c for c in doc_commands() if not is_synopsis(c[2])]


def test_the_docs_hold_commands_of_each_kind():
    assert {program for _, program, _ in CHECKED} == set(PARSERS) and len(CHECKED) >= 15


@pytest.mark.parametrize("where, program, args", CHECKED, ids=[c[0] for c in CHECKED])
def test_doc_command_parses(where, program, args):
    argv = shlex.split(re.sub(r"\$\([^)]*\)", "RUN_DIR", args).replace("$run", "RUN_DIR"), comments=True)
    overrides, rest = split_cli(argv)
    try:
        parsed = PARSERS[program]().parse_args(rest)
    except SystemExit:
        pytest.fail(f"{where}: {program} {args}: options do not parse")
    config = getattr(parsed, "config", None)
    if config:
        assert (REPO / config).is_file(), f"{where}: {config} does not exist"
    load_config(REPO / config if config else None, overrides)  # raises, naming the key, if one is wrong
