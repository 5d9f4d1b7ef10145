"""Errors a person can cause: one line on stderr, non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from helpers import extractor_env, run_cli
from psycopg import sql

pytestmark = pytest.mark.slow

PASSWORD = "secretpw"
UNREACHABLE = f"postgresql://u:{PASSWORD}@127.0.0.1:1/x"


def _assert_one_line_error(done: subprocess.CompletedProcess[str], code: int) -> str:
    """Assert a clean failure; return its one stderr line."""
    assert done.returncode == code, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize("verb", ["migrate", "sweep"])
def test_unreachable_server_is_one_line_without_the_password(verb: str) -> None:
    done = run_cli(verb, "--dsn", UNREACHABLE)

    line = _assert_one_line_error(done, 1)
    assert line.startswith("listener: error: ")
    assert "127.0.0.1" in line
    assert "port=1" in line


def test_unreachable_server_from_database_url_is_reported_the_same() -> None:
    done = run_cli("sweep", dsn=UNREACHABLE)

    line = _assert_one_line_error(done, 1)
    assert "cannot connect to host=127.0.0.1 port=1" in line


@pytest.mark.parametrize(
    "bad_dsn",
    [
        f"host=127.0.0.1 password={PASSWORD} nonsense",
        f"postgresql://u:{PASSWORD}@127.0.0.1:5432/x?sslmode=bogus&bad_option=1",
        f"password='{PASSWORD}",
        # libpq quotes this whole URI, password included, in its message.
        f"postgresql://u:{PASSWORD}@[::1/x",
    ],
)
def test_unparsable_dsn_is_one_line_without_the_password(bad_dsn: str) -> None:
    done = run_cli("migrate", "--dsn", bad_dsn)

    line = _assert_one_line_error(done, 1)
    assert "the DSN cannot be parsed" in line


def test_missing_extractor_module_is_named(dsn: str) -> None:
    done = run_cli("sweep", "--extractor", "no_such_module_xyz:extract", dsn=dsn)

    line = _assert_one_line_error(done, 1)
    assert "extractor module 'no_such_module_xyz' not found" in line


def test_missing_extractor_function_is_named(dsn: str) -> None:
    done = run_cli(
        "sweep",
        "--extractor",
        "extractors_for_tests:nope",
        dsn=dsn,
        env=extractor_env(),
    )

    line = _assert_one_line_error(done, 1)
    assert "has no 'nope'" in line


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [
        ("--max-attempts", "0", "must be at least 1, not 0"),
        ("--max-attempts", "three", "'three'"),
        ("--max-docs-per-batch-run", "-5", "must be at least 1, not -5"),
        ("--retry-delay", "-1", "must be a number of seconds >= 0, not -1"),
        ("--extract-timeout", "soon", "'soon'"),
    ],
)
def test_bad_option_value_exits_2_with_one_line(
    option: str, value: str, named: str
) -> None:
    done = run_cli("sweep", option, value, dsn=UNREACHABLE)

    line = _assert_one_line_error(done, 2)
    assert option in line
    assert named in line


def test_unknown_command_exits_2_with_one_line() -> None:
    done = run_cli("sweeep")

    _assert_one_line_error(done, 2)


def test_setting_out_of_range_is_named(dsn: str) -> None:
    done = run_cli("sweep", "--lease-seconds", "0.5", dsn=dsn)

    line = _assert_one_line_error(done, 1)
    assert "--lease-seconds must be at least 1, not 0.5" in line


def test_unmigrated_database_says_to_migrate(pg_admin_dsn: str) -> None:
    name = f"listener_t_empty_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        empty = psycopg.conninfo.make_conninfo(pg_admin_dsn, dbname=name)

        done = run_cli("sweep", dsn=empty)

        line = _assert_one_line_error(done, 1)
        assert "run `listener migrate` first" in line
    finally:
        with psycopg.connect(pg_admin_dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)
                )
            )


def test_dsn_option_wins_over_database_url(dsn: str) -> None:
    done = run_cli("migrate", "--dsn", dsn, dsn=UNREACHABLE)

    assert done.returncode == 0, done.stderr
    assert "is up to date" in done.stdout


def test_console_script_and_module_both_run() -> None:
    script = Path(sys.executable).with_name("listener")

    by_script = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, check=False
    )
    by_module = run_cli("--help")

    assert by_script.returncode == by_module.returncode == 0
    for verb in ("migrate", "sweep", "run", "status", "demo"):
        assert verb in by_script.stdout
    assert by_script.stdout == by_module.stdout
