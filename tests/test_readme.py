"""README.md tells the truth about the command line and the environment."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from listener.cli import build_parser, verb_parsers

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
VERBS = verb_parsers(build_parser())
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")

# Options of other programs that the README shows in their own commands.
FOREIGN_OPTIONS = {
    "--build",  # docker compose up
    "--scale",
    "--rm",
    "--from-literal",  # kubectl create secret
    "--now",  # systemctl enable
    "--builtin-schema",  # check-jsonschema
    "--help",
    "--only",  # python -m bench
    "--runs",
    "--listener-arg",
}


def options_of(verb: str) -> set[str]:
    """Return every long option that `listener <verb>` accepts."""
    return {
        option
        for action in VERBS[verb]._actions
        for option in action.option_strings
        if option.startswith("--")
    }


def section(title: str) -> str:
    """Return the text of the README section (## or ###) with this title."""
    match = re.search(
        rf"^(#+) {re.escape(title)}\n(.*?)(?=^#{{1,3}} |\Z)", README, re.M | re.S
    )
    assert match, f"README has no section {title!r}"
    return match.group(2)


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_option_of_every_command_is_in_the_readme(verb: str) -> None:
    missing = sorted(o for o in options_of(verb) - {"--help"} if o not in README)

    assert missing == [], f"listener {verb} options missing from README.md"


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_help_output_lists_only_documented_options(verb: str) -> None:
    """What a person sees in --help is what the README documents."""
    result = subprocess.run(
        [sys.executable, "-m", "listener", verb, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    shown = set(OPTION.findall(result.stdout)) - {"--help"}

    assert shown
    assert sorted(o for o in shown if o not in README) == []


def test_every_option_the_readme_mentions_exists() -> None:
    real = set().union(*(options_of(verb) for verb in VERBS))

    mentioned = set(OPTION.findall(README))

    assert sorted(mentioned - real - FOREIGN_OPTIONS) == []


@pytest.mark.parametrize(
    ("title", "verbs"),
    [
        ("Every command: connection and logging", sorted(VERBS)),
        ("Processing: `listener run` and `listener sweep`", ["run", "sweep"]),
        ("`listener run`", ["run"]),
        ("`listener sweep`", ["sweep"]),
        ("`listener status`", ["status"]),
        ("`listener check`", ["check"]),
    ],
)
def test_configuration_tables_name_options_of_their_commands(
    title: str, verbs: list[str]
) -> None:
    table = [line for line in section(title).splitlines() if line.startswith("| `--")]
    documented = {OPTION.findall(line)[0] for line in table}

    assert documented
    for verb in verbs:
        assert sorted(documented - options_of(verb)) == [], f"not options of {verb}"


def code_in_readme() -> list[str]:
    """Return the README's code: inline spans and indented command lines."""
    spans = re.findall(r"`([^`\n]+)`", README)
    lines = [line.strip() for line in README.splitlines() if line.startswith("    ")]
    return spans + lines


def test_listener_commands_in_the_readme_parse() -> None:
    """Every `listener <verb> ...` command shown as code parses with the real parser."""
    pattern = re.compile(
        r"(?:^|[\s/])listener ((?:" + "|".join(VERBS) + r")\b[^|&;>#]*)"
    )
    commands = [m.strip() for code in code_in_readme() for m in pattern.findall(code)]

    assert len(commands) >= 8
    for command in commands:
        # `--dsn ...` stands for a value the reader fills in.
        args = [word for word in command.split() if word != "..."]
        args = [a.replace("...", "x") for a in args]
        try:
            build_parser().parse_args(args)
        except SystemExit as exit_:
            raise AssertionError(f"README shows `listener {command}`") from exit_


def test_every_environment_variable_the_code_reads_is_documented() -> None:
    source = "\n".join(
        path.read_text(encoding="utf-8") for path in (ROOT / "listener").glob("*.py")
    )

    read = set(
        re.findall(r"os\.environ(?:\.get\(|\.setdefault\(|\[)\"([A-Z_]+)\"", source)
    )

    assert {"DATABASE_URL", "LISTENER_LOG_LEVEL"} <= read
    assert sorted(name for name in read if f"`{name}`" not in README) == []


def test_quick_start_is_one_command_that_ends_in_the_demo() -> None:
    quick = section("Quick start")

    command = next(
        line.strip() for line in quick.splitlines() if line.startswith("    ")
    )

    assert command == (
        "python3 -m venv .venv && .venv/bin/pip install '.[embedded]' "
        "&& .venv/bin/listener demo"
    )


@pytest.mark.parametrize(
    "title", ["Quick start", "Configuration", "Deployment", "Caveats"]
)
def test_readme_has_the_operator_sections(title: str) -> None:
    assert section(title).strip()
