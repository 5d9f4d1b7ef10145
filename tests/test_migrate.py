"""`listener migrate`: in order, once, under a lock, and from an installed wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import run_cli
from psycopg import sql

from listener import migrate
from listener.errors import MigrationError
from listener.migrate import apply_migrations, load_migrations

ROOT = Path(__file__).resolve().parent.parent
ALL_FILES = [m.name for m in load_migrations()]


@pytest.fixture
def empty_dsn(pg_admin_dsn: str) -> Iterator[str]:
    """Yield the DSN of a new database that no migration has touched."""
    name = f"listener_t_empty_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield psycopg.conninfo.make_conninfo(pg_admin_dsn, dbname=name)
    finally:
        with psycopg.connect(pg_admin_dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)
                )
            )


def _recorded(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT name FROM listener_migrations ORDER BY version"
        ).fetchall()
    return [name for (name,) in rows]


def _scalar(dsn: str, query: str) -> Any:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query.encode()).fetchone()
    assert row is not None
    return row[0]


def _use_sql_directory(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    monkeypatch.setattr(migrate, "sql_directory", lambda: path)


def test_files_are_numbered_in_order() -> None:
    assert sorted(ALL_FILES) == ALL_FILES
    assert ALL_FILES[0] == "001_tables.sql"
    assert len(ALL_FILES) >= 5


@pytest.mark.slow
def test_migrate_twice_applies_nothing_the_second_time(empty_dsn: str) -> None:
    first = run_cli("migrate", dsn=empty_dsn)
    second = run_cli("migrate", dsn=empty_dsn)

    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(f"migrate: applied {', '.join(ALL_FILES)} on ")
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip().endswith("is up to date")
    assert _recorded(empty_dsn) == ALL_FILES
    assert _scalar(empty_dsn, "SELECT to_regproc('claim_batch')") is not None


def test_every_migration_file_can_run_again(dsn: str) -> None:
    """Re-running a file's DDL over itself is harmless: IF NOT EXISTS, OR REPLACE."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for migration in load_migrations():
            with conn.transaction():
                conn.execute(migration.sql.encode())

    assert apply_migrations(dsn) == []


@pytest.mark.parametrize("round_", range(3))
def test_concurrent_migrations_apply_the_schema_once(
    empty_dsn: str, round_: int
) -> None:
    barrier = threading.Barrier(2)
    applied: list[list[str]] = []
    errors: list[BaseException] = []

    def migrate_now() -> None:
        try:
            barrier.wait(timeout=10)
            applied.append(apply_migrations(empty_dsn))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=migrate_now) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    assert sorted(applied, key=len) == [[], ALL_FILES]
    assert _recorded(empty_dsn) == ALL_FILES


@pytest.mark.slow
def test_two_migrate_processes_at_once_both_succeed(empty_dsn: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["DATABASE_URL"] = empty_dsn
    command = [sys.executable, "-m", "listener", "migrate"]

    procs = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=60)[0] for proc in procs]

    assert [proc.returncode for proc in procs] == [0, 0]
    assert sorted("applied" in out for out in outputs) == [False, True]
    assert _recorded(empty_dsn) == ALL_FILES


def test_later_migration_can_change_an_earlier_object(
    empty_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use_sql_directory(monkeypatch, tmp_path)
    (tmp_path / "001_answer.sql").write_text(
        "CREATE OR REPLACE FUNCTION answer() RETURNS int LANGUAGE sql AS 'SELECT 1';"
    )
    first = apply_migrations(empty_dsn)
    (tmp_path / "002_better_answer.sql").write_text(
        "CREATE OR REPLACE FUNCTION answer() RETURNS int LANGUAGE sql AS 'SELECT 42';"
    )

    second = apply_migrations(empty_dsn)

    assert first == ["001_answer.sql"]
    assert second == ["002_better_answer.sql"]
    assert _scalar(empty_dsn, "SELECT answer()") == 42


def test_failing_migration_is_named_and_rolled_back(
    empty_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use_sql_directory(monkeypatch, tmp_path)
    (tmp_path / "001_good.sql").write_text("CREATE TABLE good (id int);")
    (tmp_path / "002_bad.sql").write_text("CREATE TABLE half (id int); SELECT 1/0;")

    with pytest.raises(MigrationError, match=r"migration 002_bad\.sql failed"):
        apply_migrations(empty_dsn)

    assert _recorded(empty_dsn) == ["001_good.sql"]
    assert _scalar(empty_dsn, "SELECT to_regclass('half')") is None
    (tmp_path / "002_bad.sql").write_text("CREATE TABLE half (id int);")
    assert apply_migrations(empty_dsn) == ["002_bad.sql"]


def test_two_files_with_one_number_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use_sql_directory(monkeypatch, tmp_path)
    (tmp_path / "001_one.sql").write_text("SELECT 1;")
    (tmp_path / "001_other.sql").write_text("SELECT 1;")

    with pytest.raises(MigrationError, match="share a number"):
        load_migrations()


def _run(*command: str | Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(c) for c in command],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        **kwargs,
    )
    assert done.returncode == 0, (command, done.stdout, done.stderr)
    return done


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_installed_wheel_migrates_and_sweeps(empty_dsn: str, tmp_path: Path) -> None:
    """`pip install` of the built wheel, not the source tree, carries the SQL."""
    wheels, venv, elsewhere = tmp_path / "wheels", tmp_path / "venv", tmp_path / "cwd"
    elsewhere.mkdir()
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, ROOT)
    (wheel,) = wheels.glob("*.whl")
    _run(sys.executable, "-m", "venv", venv)
    _run(venv / "bin" / "python", "-m", "pip", "install", "-q", wheel)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["DATABASE_URL"] = empty_dsn

    where = _run(
        venv / "bin" / "python",
        "-c",
        "import listener.migrate as m; print(m.__file__); print(m.sql_directory())",
        cwd=elsewhere,
        env=env,
    )
    migrated = _run(venv / "bin" / "listener", "migrate", cwd=elsewhere, env=env)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute(
            "WITH b AS (INSERT INTO extraction_batches (user_id) VALUES ('u1')"
            " RETURNING id) INSERT INTO documents (batch_id, user_id, file_name,"
            " content) SELECT id, 'u1', 'a.txt', 'some text' FROM b"
        )
    swept = _run(venv / "bin" / "listener", "sweep", cwd=elsewhere, env=env)

    module_file, sql_dir = where.stdout.split()
    assert module_file.startswith(str(venv))
    assert sql_dir.startswith(str(venv))
    assert migrated.stdout.startswith(f"migrate: applied {', '.join(ALL_FILES)} on ")
    assert "1 documents completed" in swept.stdout
    assert _scalar(empty_dsn, "SELECT status FROM extraction_batches") == "completed"
