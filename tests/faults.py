"""The fault-injection harness: listener processes to kill and restart, a TCP
proxy that drops or stalls connections, a private PostgreSQL to restart, and
the end-of-run verdict every fault test reaches.

`from faults import ...` in test modules; nothing here is a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from helpers import extractor_env
from processes import ListenerProcess
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

Conn = psycopg.Connection[Any]
TERMINAL = ("completed", "partially_completed", "failed", "cancelled")


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll condition until it holds; return the seconds it took.

    :raises AssertionError: it did not hold within timeout seconds.
    """
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - started


# --- listener processes ---------------------------------------------------------


@dataclass
class Fleet:
    """Listener processes of one test: start, kill, restart, stop them all."""

    dsn: str
    extractor: str
    options: list[str]
    env: dict[str, str]
    children: list[ListenerProcess] = field(default_factory=list)
    retired: list[ListenerProcess] = field(default_factory=list)

    def start(self, dsn: str | None = None) -> ListenerProcess:
        """Start one more listener and wait until it is ready."""
        child = ListenerProcess(
            dsn or self.dsn, *self.options, extractor=self.extractor, env=self.env
        )
        self.children.append(child)
        child.wait_ready()
        return child

    def kill(self, child: ListenerProcess) -> None:
        """SIGKILL one listener."""
        child.kill()
        self.children.remove(child)
        self.retired.append(child)

    def stop_all(self) -> list[int]:
        """SIGTERM every running listener; return their exit codes."""
        codes = [child.stop() for child in self.children]
        self.retired.extend(self.children)
        self.children.clear()
        return codes

    def kill_all(self) -> None:
        """SIGKILL whatever still runs (the test's cleanup)."""
        for child in list(self.children):
            self.kill(child)

    def logs(self) -> str:
        """Return the last lines of every listener's log, for a failure message."""
        return "\n---\n".join(c.log(20) for c in [*self.retired, *self.children])


@contextlib.contextmanager
def fleet(
    dsn: str,
    tmp_path: Path,
    *options: str,
    extractor: str,
    **env: str,
) -> Iterator[Fleet]:
    """Yield a Fleet running `extractor` from the tests directory; kill it after."""
    record = tmp_path / "calls.txt"
    made = Fleet(dsn, extractor, list(options), extractor_env(record) | env)
    try:
        yield made
    finally:
        made.kill_all()


class LeaseWatch:
    """Time, in a thread, until a dead worker's leases are all broken.

    A lease is broken when its document no longer carries its token: the
    sweep recovered it, or it was claimed again after that.
    """

    def __init__(self, dsn: str, leases: list[tuple[uuid.UUID, uuid.UUID]]) -> None:
        self.seconds: float | None = None
        self._leases = leases
        self._dsn = dsn
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    @staticmethod
    def held_by(conn: Conn, pid: int) -> list[tuple[uuid.UUID, uuid.UUID]]:
        """Return the (document, lease token) pairs the process with pid holds."""
        rows = conn.execute(
            "SELECT id, lease_token FROM documents WHERE status = 'processing'"
            " AND lease_owner LIKE %s",
            (f"%:{pid}:%",),
        ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def _watch(self) -> None:
        ids = [doc for doc, _ in self._leases]
        tokens = [token for _, token in self._leases]
        with psycopg.connect(self._dsn, autocommit=True) as conn:
            deadline = self._started + 120
            while time.monotonic() < deadline:
                row = conn.execute(
                    "SELECT count(*) FROM documents d"
                    " JOIN unnest(%s::uuid[], %s::uuid[]) AS l (id, token)"
                    " ON d.id = l.id AND d.lease_token = l.token",
                    (ids, tokens),
                ).fetchone()
                if row == (0,):
                    self.seconds = time.monotonic() - self._started
                    return
                time.sleep(0.05)

    def result(self) -> float:
        """Return the seconds it took; fail if the leases were never broken."""
        self._thread.join(130)
        assert self.seconds is not None, "a dead worker's leases were never broken"
        return self.seconds


# --- the TCP proxy --------------------------------------------------------------


class TcpProxy:
    """A TCP proxy in a thread of its own that can drop or stall connections.

    drop() resets every open connection at once. stall() black-holes every
    open connection for good and every new one until heal(): bytes are read
    and never forwarded, nothing is closed, no error ever reaches either side,
    as with a peer that vanished behind a NAT or a firewall.
    """

    def __init__(self, upstream: dict[str, Any]) -> None:
        self._upstream = upstream
        self._loop = asyncio.new_event_loop()
        self._connections: set[_ProxiedConnection] = set()
        self._stalled = False
        self.accepted = 0
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, args=(ready,), daemon=True, name="tcp-proxy"
        )
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("tcp proxy did not start")

    @classmethod
    def to(cls, dsn: str) -> TcpProxy:
        """Return a proxy in front of the server a DSN names (TCP or Unix socket)."""
        params = conninfo_to_dict(dsn)
        host = str(params.get("host") or "localhost")
        port = int(params.get("port") or 5432)
        if host.startswith("/"):
            return cls({"path": f"{host}/.s.PGSQL.{port}"})
        return cls({"host": host, "port": port})

    def dsn(self, dsn: str) -> str:
        """Return dsn routed through this proxy."""
        return make_conninfo(dsn, host="127.0.0.1", port=str(self.port))

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._accept, "127.0.0.1", 0)
        )
        self.port = int(server.sockets[0].getsockname()[1])
        self._server = server
        ready.set()
        self._loop.run_forever()

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.accepted += 1
        if "path" in self._upstream:
            up_reader, up_writer = await asyncio.open_unix_connection(
                self._upstream["path"]
            )
        else:
            up_reader, up_writer = await asyncio.open_connection(
                self._upstream["host"], self._upstream["port"]
            )
        connection = _ProxiedConnection(writer, up_writer, stalled=self._stalled)
        self._connections.add(connection)
        try:
            await asyncio.gather(
                connection.pipe(reader, up_writer), connection.pipe(up_reader, writer)
            )
        finally:
            self._connections.discard(connection)
            connection.abort()

    def _call(self, function: Callable[[], None]) -> None:
        done = threading.Event()

        def run() -> None:
            function()
            done.set()

        self._loop.call_soon_threadsafe(run)
        if not done.wait(10):
            raise RuntimeError("tcp proxy did not answer")

    def drop(self) -> int:
        """Reset every open connection; return how many there were."""
        dropped: list[int] = []

        def run() -> None:
            dropped.append(len(self._connections))
            for connection in list(self._connections):
                connection.abort()

        self._call(run)
        return dropped[0]

    def stall(self) -> int:
        """Black-hole every open and every new connection; return how many open."""
        stalled: list[int] = []

        def run() -> None:
            self._stalled = True
            stalled.append(len(self._connections))
            for connection in self._connections:
                connection.stalled = True

        self._call(run)
        return stalled[0]

    def heal(self) -> None:
        """Let new connections through again; stalled ones stay black holes."""

        def run() -> None:
            self._stalled = False

        self._call(run)

    def close(self) -> None:
        """Close every connection and stop the proxy."""

        def run() -> None:
            self._server.close()
            for connection in list(self._connections):
                connection.abort()

        self._call(run)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


class _ProxiedConnection:
    def __init__(
        self,
        client: asyncio.StreamWriter,
        server: asyncio.StreamWriter,
        *,
        stalled: bool,
    ) -> None:
        self._writers = (client, server)
        self.stalled = stalled

    async def pipe(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await source.read(65536):
                if self.stalled:
                    continue
                sink.write(data)
                await sink.drain()
        # One side closed: close the other, unless stalled, when nothing may show.
        if not self.stalled:
            self.abort()

    def abort(self) -> None:
        for writer in self._writers:
            writer.transport.abort()


# --- a private PostgreSQL that may be restarted -----------------------------------


class PrivateServer:
    """An embedded PostgreSQL (pgserver) of the test's own, to stop and start.

    Never the machine's shared server: other people use that one.
    """

    def __init__(self) -> None:
        from pgserver import _commands
        from pgserver.postgres_server import get_server

        self._pg_ctl = _commands.pg_ctl  # type: ignore[attr-defined]
        self._dir = Path(tempfile.mkdtemp(prefix="listener-fault-pg-"))
        self.pgdata = self._dir / "data"
        self._server = get_server(self.pgdata, cleanup_mode="stop")
        self.dsn = str(self._server.get_uri())
        self._socket_dir = str(conninfo_to_dict(self.dsn)["host"])

    def database(self, name: str) -> str:
        """Create a database; return its DSN."""
        with psycopg.connect(self.dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return make_conninfo(self.dsn, dbname=name)

    def crash(self) -> None:
        """Stop the server the way a crash does: no checkpoint, clients cut."""
        self._pg_ctl(
            ["-w", "-m", "immediate", "stop"],
            pgdata=self.pgdata,
            user=self._server.system_user,
            timeout=30,
        )

    def start(self) -> None:
        """Start it again on the same socket; crash recovery runs first."""
        self._pg_ctl(
            [
                "-w",
                "-o", '-h ""',
                "-o", f"-k {self._socket_dir}",
                "-l", str(self.pgdata / "log"),
                "start",
            ],
            pgdata=self.pgdata,
            user=self._server.system_user,
            timeout=60,
        )  # fmt: skip

    def close(self) -> None:
        """Stop the server and delete its files."""
        with contextlib.suppress(Exception):
            self._server.cleanup()
        shutil.rmtree(self._dir, ignore_errors=True)


# --- arranging work and the verdict ------------------------------------------------


def insert_batches(
    conn: Conn,
    n_batches: int,
    docs_per_batch: int,
    *,
    users: int = 4,
    file_names: Callable[[int], str] | None = None,
) -> list[uuid.UUID]:
    """Insert batches of text documents, one transaction each; return their ids."""
    ids = []
    for i in range(n_batches):
        with conn.transaction():
            row = conn.execute(
                "INSERT INTO extraction_batches (user_id) VALUES (%s) RETURNING id",
                (f"user{i % users}",),
            ).fetchone()
            assert row is not None
            names = [
                file_names(j) if file_names else f"doc-{j}.txt"
                for j in range(docs_per_batch)
            ]
            conn.execute(
                "INSERT INTO documents (batch_id, user_id, file_name, content)"
                " SELECT %s, %s, name, convert_to('words for ' || name, 'UTF8')"
                " FROM unnest(%s::text[]) AS name",
                (row[0], f"user{i % users}", names),
            )
        ids.append(row[0])
    return ids


def all_finished(conn: Conn, batches: list[uuid.UUID]) -> bool:
    """Return whether every batch has reached a terminal state."""
    row = conn.execute(
        "SELECT count(*) FROM extraction_batches WHERE id = ANY(%s)"
        " AND status NOT IN ('completed', 'partially_completed', 'failed',"
        " 'cancelled')",
        (batches,),
    ).fetchone()
    return row == (0,)


@dataclass(frozen=True)
class Verdict:
    """What the database says after a fault run."""

    documents: int
    completed: int
    failed: int
    charged: int
    recovered: int
    violations: list[tuple[Any, ...]]

    def line(self, name: str, faults: str, recovery: str) -> str:
        """Return the figures of one run as one line for the test's output."""
        return (
            f"\nFAULT {name}: {self.documents} documents, faults: {faults}; "
            f"{self.recovered} documents recovered (tried more than once), "
            f"{recovery}; completed {self.completed}, failed {self.failed}, "
            f"charged {self.charged}, violations {len(self.violations)}"
        )


def verdict(conn: Conn, max_attempts: int) -> Verdict:
    """Return the figures and listener_check()'s findings for the whole database."""
    row = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE status = 'completed'),"
        " count(*) FILTER (WHERE status = 'failed'),"
        " count(*) FILTER (WHERE attempts > 1)"
        " FROM documents"
    ).fetchone()
    charged = conn.execute(
        "SELECT coalesce(sum(documents_processed), 0) FROM user_usage"
    ).fetchone()
    assert row is not None and charged is not None
    violations = conn.execute(
        "SELECT * FROM listener_check(%s, 0)", (max_attempts,)
    ).fetchall()
    return Verdict(
        documents=int(row[0]),
        completed=int(row[1]),
        failed=int(row[2]),
        charged=int(charged[0]),
        recovered=int(row[3]),
        violations=violations,
    )


def assert_exact(conn: Conn, result: Verdict) -> None:
    """Assert a clean check and usage equal, per user, to the completed documents."""
    assert result.violations == []
    per_user = conn.execute(
        "SELECT d.user_id, count(*) FILTER (WHERE d.status = 'completed'),"
        " coalesce(max(u.documents_processed), 0)"
        " FROM documents d LEFT JOIN user_usage u USING (user_id)"
        " GROUP BY d.user_id"
    ).fetchall()
    assert [(u, c) for u, c, _ in per_user] == [(u, n) for u, _, n in per_user]
    assert result.charged == result.completed
