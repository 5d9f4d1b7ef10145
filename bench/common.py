"""What every benchmark shares: the server, scratch databases, figures, CPU clocks."""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from listener.migrate import apply_migrations

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Every scratch database this suite creates starts with this prefix.
PREFIX = "listener_bench_"


@dataclass
class Figure:
    """One measured quantity over several runs."""

    name: str
    unit: str
    values: list[float] = field(default_factory=list)
    # How many decimals to print.
    digits: int = 0

    def add(self, value: float) -> None:
        """Record one run's value."""
        self.values.append(value)

    @property
    def median(self) -> float:
        """Return the median of the runs."""
        return statistics.median(self.values)

    def describe(self) -> str:
        """Return `name: median unit (min-max, n runs)`."""
        if not self.values:
            return f"{self.name}: not measured"
        fmt = f"{{:,.{self.digits}f}}"
        spread = (
            f"{fmt.format(min(self.values))}-{fmt.format(max(self.values))}"
            if len(self.values) > 1
            else "one run"
        )
        return (
            f"{self.name}: {fmt.format(self.median)} {self.unit} "
            f"(min-max {spread}, n={len(self.values)})"
        )


def say(text: str) -> None:
    """Print a progress or result line at once."""
    print(text, flush=True)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the nearest-rank percentile of values (fraction in 0..1)."""
    ordered = sorted(values)
    rank = max(1, round(fraction * len(ordered) + 0.5))
    return ordered[min(rank, len(ordered)) - 1]


class Server:
    """A PostgreSQL server on which the suite creates and drops its own databases."""

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn
        self._created: list[str] = []

    def dsn_of(self, name: str) -> str:
        """Return the DSN of database `name` on this server."""
        return make_conninfo(self.admin_dsn, dbname=name)

    def create_database(self, purpose: str, *, migrate: bool = True) -> str:
        """Create a fresh (migrated) scratch database; return its DSN."""
        name = f"{PREFIX}{purpose}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.admin_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self._created.append(name)
        dsn = self.dsn_of(name)
        if migrate:
            apply_migrations(dsn)
        return dsn

    def drop_database(self, dsn: str) -> None:
        """Drop one scratch database created here."""
        name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
        assert isinstance(name, str) and name in self._created
        with psycopg.connect(self.admin_dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)
                )
            )
        self._created.remove(name)

    def drop_all(self) -> None:
        """Drop every scratch database still left."""
        for name in list(self._created):
            self.drop_database(self.dsn_of(name))

    def settings(self) -> dict[str, str]:
        """Return the server settings that matter to the figures."""
        names = [
            "server_version",
            "fsync",
            "synchronous_commit",
            "shared_buffers",
            "wal_sync_method",
            "max_connections",
        ]
        found = {}
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            for name in names:
                shown = conn.execute(
                    sql.SQL("SHOW {}").format(sql.Identifier(name))
                ).fetchone()
                found[name] = str(shown[0]) if shown else "?"
        return found


@contextlib.contextmanager
def open_server(dsn: str | None) -> Iterator[Server]:
    """Yield the server named by dsn, else a private embedded pgserver."""
    if dsn:
        server = Server(dsn)
        try:
            yield server
        finally:
            server.drop_all()
        return

    os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())
    from pgserver.postgres_server import get_server

    data_dir = Path(tempfile.mkdtemp(prefix="listener-bench-pg-"))
    say(f"no --dsn or BENCH_DSN: starting an embedded pgserver in {data_dir}")
    pg = get_server(data_dir / "data", cleanup_mode="stop")
    server = Server(pg.get_uri())
    try:
        yield server
    finally:
        server.drop_all()
        pg.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)


def process_cpu_seconds(pid: int) -> float:
    """Return the user + system CPU seconds a live process has used."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    # Fields 14 and 15 of stat(5), counted after the command name.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def peak_rss_mib(pid: int) -> float:
    """Return the peak resident set size (VmHWM) of a live process in MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise LookupError(f"no VmHWM for process {pid}")


class BackendClock:
    """CPU time of the PostgreSQL backends serving one database (local server only)."""

    def __init__(self, conn: psycopg.Connection[Any], dbname: str) -> None:
        self._conn = conn
        self._dbname = dbname
        self._before: dict[int, float] = {}
        self.available = True

    def _sample(self) -> dict[int, float]:
        rows = self._conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (self._dbname,)
        ).fetchall()
        found = {}
        for (pid,) in rows:
            try:
                found[pid] = process_cpu_seconds(pid)
            except OSError:
                self.available = False
        return found

    def start(self) -> None:
        """Take the starting sample."""
        self._before = self._sample()

    def elapsed(self) -> float:
        """Return the CPU seconds the database's backends used since start()."""
        after = self._sample()
        return sum(t - self._before.get(pid, 0.0) for pid, t in after.items())


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.01
) -> None:
    """Poll predicate until it holds; raise TimeoutError naming `what` after timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def python() -> str:
    """Return the interpreter that runs the listener under test."""
    return sys.executable
