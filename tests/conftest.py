"""Give every test a fresh, migrated PostgreSQL database.

The chain: one server per run (`pg_admin_dsn`), one migrated template database
per run (`template_db`), and one clone of it per test (`dsn`, `conn`). The
server is, in order of preference, the one named by `LISTENER_TEST_DSN`, a
`postgres:16` container when Docker answers, or an embedded pgserver.
"""

from __future__ import annotations

import functools
import gc
import os
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

# Test modules import their helpers as `from helpers import ...`, whatever
# import mode pytest runs in.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

ENV_DSN = "LISTENER_TEST_DSN"
DOCKER_IMAGE = "postgres:16"

# What the run's server turned out to be, for the terminal summary.
_chosen: list[str] = []


def _ensure_runtime_dir() -> None:
    """Point XDG_RUNTIME_DIR at a private directory when the session has none.

    pgserver asks platformdirs for a runtime directory at import time, and
    platformdirs warns (an error under `filterwarnings = error`) when the
    variable is unset or the directory is not a 0700 one of our own.
    """
    if os.environ.get("XDG_RUNTIME_DIR"):
        return
    path = Path(tempfile.gettempdir()) / f"listener-runtime-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    path.chmod(0o700)
    os.environ["XDG_RUNTIME_DIR"] = str(path)


# Before anything (this file, the package, a test) imports pgserver.
_ensure_runtime_dir()


def describe_dsn(dsn: str) -> str:
    """Return the host, port, database and user of a DSN, never its password."""
    params = conninfo_to_dict(dsn)
    shown = ("host", "port", "dbname", "user")
    return " ".join(f"{key}={params[key]}" for key in shown if params.get(key))


def database_dsn(base: str, dbname: str) -> str:
    """Return `base` with its database replaced by `dbname`."""
    return make_conninfo(base, dbname=dbname)


@functools.cache
def _docker_answers() -> bool:
    """Return whether a Docker daemon answers a ping within a few seconds."""
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return False

    # A failed ping leaves its socket to the garbage collector, whose
    # ResourceWarning would fail whichever test happened to be running.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        answers = _ping_docker()
        gc.collect()
    return answers


def _ping_docker() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def _planned_server() -> str:
    """Return which kind of server this run will try first."""
    if os.environ.get(ENV_DSN):
        return f"${ENV_DSN}"
    if _docker_answers():
        return f"docker ({DOCKER_IMAGE}), else embedded pgserver"
    return "embedded pgserver (no $LISTENER_TEST_DSN, docker unreachable)"


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Name the PostgreSQL server the run will use."""
    return [f"listener test database: {_planned_server()}"]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say which PostgreSQL server the run actually used."""
    for line in _chosen:
        terminalreporter.write_line(f"listener test database: {line}")


def _server_version(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    assert row is not None
    return str(row[0])


def _start_container() -> Any | None:
    """Start a PostgreSQL container, or return None when that is impossible."""
    try:
        with warnings.catch_warnings():
            # Older testcontainers only have the deprecated module path.
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                from testcontainers.community.postgres import PostgresContainer
            except ImportError:
                from testcontainers.postgres import PostgresContainer
            container = PostgresContainer(DOCKER_IMAGE, driver=None)
            container.start()
        return container
    except Exception as exc:
        _chosen.append(f"docker failed ({type(exc).__name__}: {exc}), fell back")
        return None


@pytest.fixture(scope="session")
def pg_admin_dsn() -> Iterator[str]:
    """Yield the DSN of a PostgreSQL server on which tests may CREATE DATABASE."""
    given = os.environ.get(ENV_DSN)
    if given:
        _chosen.append(f"${ENV_DSN}: {describe_dsn(given)}")
        yield given
        return

    if _docker_answers():
        container = _start_container()
        if container is not None:
            try:
                url = container.get_connection_url(driver=None)
                _chosen.append(f"docker PostgreSQL {_server_version(url)}")
                yield url
            finally:
                container.stop()
            return

    from pgserver.postgres_server import get_server

    tmpdir = tempfile.mkdtemp(prefix="listener-pg-")
    server = get_server(Path(tmpdir) / "data", cleanup_mode="stop")
    try:
        uri = server.get_uri()
        _chosen.append(
            f"embedded pgserver PostgreSQL {_server_version(uri)}: {describe_dsn(uri)}"
        )
        yield uri
    finally:
        server.cleanup()
        shutil.rmtree(tmpdir, ignore_errors=True)


def _drop_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)
            )
        )


@pytest.fixture(scope="session")
def template_db(pg_admin_dsn: str) -> Iterator[str]:
    """Yield the name of a migrated database that each test's database copies."""
    from listener.migrate import apply_migrations

    name = f"listener_tpl_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    try:
        apply_migrations(database_dsn(pg_admin_dsn, name))

        # CREATE DATABASE ... TEMPLATE refuses a template anyone is connected
        # to, so shut out leftovers and any later connection by mistake.
        with psycopg.connect(pg_admin_dsn, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            admin.execute(
                sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(
                    sql.Identifier(name)
                )
            )
        yield name
    finally:
        _drop_database(pg_admin_dsn, name)


def _clone_database(admin_dsn: str, name: str, template: str) -> None:
    statement = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
        sql.Identifier(name), sql.Identifier(template)
    )
    deadline = time.monotonic() + 10
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        # Copying the files of a small template takes half the time of the
        # default WAL_LOG strategy of PostgreSQL 15 and later.
        if admin.info.server_version >= 150000:
            statement += sql.SQL(" STRATEGY FILE_COPY")
        while True:
            try:
                admin.execute(statement)
                return
            # A backend just terminated may still be leaving the template.
            except psycopg.errors.ObjectInUse:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@pytest.fixture
def dsn(pg_admin_dsn: str, template_db: str) -> Iterator[str]:
    """Yield the DSN of a fresh migrated database of this test's own."""
    name = f"listener_t_{uuid.uuid4().hex[:12]}"
    _clone_database(pg_admin_dsn, name, template_db)
    try:
        yield database_dsn(pg_admin_dsn, name)
    finally:
        _drop_database(pg_admin_dsn, name)


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    """Yield an autocommit connection to this test's database."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        yield connection
