"""Every flag of every command, as declared: its spellings, destination, default, type, choices,
metavar, action and help text, against `cli_reference.json`.

A change to the command line (a new flag, a default, a help text) must be made on purpose: it
fails here until the reference is rewritten with ``DALLE_TRAIN_UPDATE_REFERENCE=1 pytest
tests/test_cli_reference.py`` and the diff is read. Raw declarations are compared, not
argparse's formatted ``--help``, which differs between Python versions.

Besides: a help text that states a default ("(default X)") states the flag's real default.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from dalle_train.cli import build_parser
from dalle_train.commands.dalle import MODEL_DEFAULTS

REFERENCE = Path(__file__).with_name("cli_reference.json")


def _value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_value(item) for item in value]
    if isinstance(value, type):
        return value.__name__
    if callable(value):
        return getattr(value, "__name__", type(value).__name__)
    return str(value)


def declarations(parser: argparse.ArgumentParser) -> list[dict[str, Any]]:
    return [
        {
            "flags": list(action.option_strings), "dest": action.dest, "default": _value(action.default),
            "type": _value(action.type), "choices": _value(action.choices) if action.choices else None,
            "metavar": _value(action.metavar), "action": type(action).__name__, "nargs": _value(action.nargs),
            "const": _value(action.const), "required": action.required, "help": action.help,
        }
        for action in parser._actions
        if not isinstance(action, (argparse._SubParsersAction, argparse._HelpAction, argparse._VersionAction))
    ]


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    found = {"dalle-train": parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def reference() -> dict[str, Any]:
    return {
        name: {"description": parser.description, "flags": declarations(parser)}
        for name, parser in commands().items()
    }


def test_the_command_line_is_the_reference() -> None:
    current = reference()
    if os.environ.get("DALLE_TRAIN_UPDATE_REFERENCE"):
        REFERENCE.write_text(json.dumps(current, indent=1) + "\n")
    expected = json.loads(REFERENCE.read_text())
    assert list(current) == list(expected)
    for name in expected:
        assert current[name]["description"] == expected[name]["description"], name
        assert current[name]["flags"] == expected[name]["flags"], name


def _stated_defaults() -> list[tuple[str, str, Any]]:
    found = []
    for name, parser in commands().items():
        for action in parser._actions:
            match = re.search(r"\(default:? ([^;)]+)\)", action.help or "")
            if match and action.option_strings:
                found.append((f"{name} {action.option_strings[0]}", match.group(1).strip(), action))
    return found


#: defaults a help text describes instead of giving: (flag, real default) -> the description
DESCRIBED = {
    ("--device", "auto"): {"cuda if available", "cuda when available"},
    ("--threads", None): {"torch's choice"},
    ("--sample-prompts", None): {"captions of the first samples"},
    ("--seed", None): {"a random one, printed"},
}


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


@pytest.mark.parametrize("flag,stated,action", _stated_defaults(), ids=lambda value: str(value)[:40])
def test_a_stated_default_is_the_real_one(flag: str, stated: str, action: argparse.Action) -> None:
    real = action.default
    if real is None and action.dest in MODEL_DEFAULTS:  # DALLE model flags: the model's default
        real = MODEL_DEFAULTS[action.dest]
    described = DESCRIBED.get((action.option_strings[0], real))
    if described is not None:
        assert stated in described, flag
    elif isinstance(real, (int, float)) and not isinstance(real, bool):
        assert float(stated) == real, flag
    else:
        assert Path(stated) == Path(_shown(real)), flag  # a path as written: ./outputs is outputs
