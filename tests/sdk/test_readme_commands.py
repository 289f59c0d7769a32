"""The documentation's commands exist as written: in the README and the other guides, every
``edgespec ...`` command names real subcommands and only options those subcommands have, and
every ``python -m MODULE`` names a module of the project. (A command renamed or an option
dropped would otherwise leave a guide telling users to run what fails.)"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from edgespec.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "deploy/README.md", "core/demo_models/MODEL_CARD.md")
FENCED = re.compile(r"```[a-z]*\n(.*?)```", re.S)


def _commands(prefix: str) -> list[str]:
    """Every command starting with `prefix` in the guides: lines of fenced blocks (comments
    cut) and inline code spans (a span may wrap across lines), whitespace normalised."""
    found = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for block in FENCED.findall(text):
            for line in block.splitlines():
                line = line.split(" #")[0].strip()
                if line.startswith(prefix):
                    found.append(line)
        for span in re.findall(r"`([^`]+)`", FENCED.sub("", text)):
            command = " ".join(span.split())
            if command.startswith(prefix):
                found.append(command)
    return found


def _subcommand(
    parser: argparse.ArgumentParser, words: list[str]
) -> tuple[argparse.ArgumentParser, str]:
    """The (sub)parser the leading words select, and their path ("edgespec bench link")."""
    path = parser.prog
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and words and words[0] in action.choices:
            return _subcommand(action.choices[words[0]], words[1:])
    return parser, path


EDGESPEC = _commands("edgespec ")
MODULES = _commands("python -m ")


def _problem(command: str) -> str | None:
    """What is wrong with an ``edgespec ...`` or ``python -m ...`` command, or None."""
    argv = shlex.split(command)
    if argv[0] == "edgespec":
        parser, path = _subcommand(build_parser(), argv[1:])
        if path == "edgespec":
            return "it names no subcommand"
        options = [a.split("=")[0] for a in argv[1:] if re.match(r"--?[a-zA-Z]", a)]
        unknown = [o for o in options if o not in parser._option_string_actions]
        return f"{path} has no option {unknown}" if unknown else None
    module = argv[2]
    if module.split(".")[0] == "edgespec":
        found = importlib.util.find_spec(module) is not None
    else:  # a folder of the repository, run from its root (experiments.*)
        rel = Path(*module.split("."))
        found = (ROOT / rel.with_suffix(".py")).is_file() or (ROOT / rel / "__main__.py").is_file()
    return None if found else f"no module {module}"


def test_the_guides_show_commands():
    assert len(EDGESPEC) >= 20 and len(MODULES) >= 3, (len(EDGESPEC), len(MODULES))


@pytest.mark.parametrize("command", EDGESPEC + MODULES)
def test_command_exists_as_written(command: str):
    assert _problem(command) is None, f"{command!r}: {_problem(command)}"


@pytest.mark.parametrize(
    "command",
    [
        "edgespec bench link --json F --no-such-option",
        "edgespec benchmark link",
        "python -m experiments.grpc_bound --json F",  # removed in session 23
        "python -m edgespec.no_such_module",
    ],
)
def test_the_check_finds_what_does_not_exist(command: str):
    assert _problem(command) is not None


def test_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, flags=re.M))
    named = {shlex.split(c)[1] for c in _commands("make ") if len(shlex.split(c)) > 1}
    assert {"demo", "test"} <= named, named  # the README's two first commands
    assert named <= targets, (
        f"make targets the guides name but the Makefile lacks: {named - targets}"
    )
