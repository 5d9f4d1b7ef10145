"""Read the deployment files for the tests: `from deploy_files import ...`."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from listener.cli import build_parser, verb_parsers

ROOT = Path(__file__).resolve().parent.parent
INSTALLED_LISTENER = "/opt/listener/.venv/bin/listener"


def load_yaml(path: Path) -> Any:
    """Return the one YAML document in path, anchors and merge keys resolved."""
    return YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))


def load_yaml_all(path: Path) -> list[Any]:
    """Return every YAML document in path."""
    return list(YAML(typ="safe", pure=True).load_all(path.read_text(encoding="utf-8")))


def parse_listener_args(args: list[str]) -> Any:
    """Parse a `listener ...` argument list with the real parser; fail if it cannot."""
    try:
        return build_parser().parse_args(args)
    except SystemExit as exit_:
        raise AssertionError(f"not a valid listener command line: {args}") from exit_


def listener_args(command_line: str) -> list[str]:
    """Return the arguments after the `listener` executable in a shell command."""
    lexer = shlex.shlex(command_line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)
    verbs = set(verb_parsers(build_parser()))
    for index, word in enumerate(words):
        is_listener = word == "listener" or word.endswith("/listener")
        if is_listener and words[index + 1 : index + 2] and words[index + 1] in verbs:
            args: list[str] = []
            rest = words[index + 1 :]
            for position, arg in enumerate(rest):
                # A shell operator or a redirection (`2>&1`: 2, >&, 1) ends it.
                following = rest[position + 1 : position + 2]
                if arg[0] in "|&;<>" or (
                    arg.isdigit() and any(f[0] in "<>" for f in following)
                ):
                    break
                args.append(arg)
            return args
    raise AssertionError(f"no listener command in {command_line!r}")
