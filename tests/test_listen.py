"""The notify triggers and the LISTEN connection: what is sent, what is heard."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import psycopg
import pytest
from helpers import make_batch
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from listener.listen import (
    APPLICATION_NAME,
    BatchFinished,
    Handlers,
    Listener,
    ListenSettings,
    listen_options,
    parse_finished,
    parse_work,
)

SENTINEL = "sentinel"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def listening(conn: psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
    """Yield `conn` listening on batch_work and batch_finished."""
    conn.execute("LISTEN batch_work")
    conn.execute("LISTEN batch_finished")
    yield conn


def heard(conn: psycopg.Connection[Any], dsn: str) -> list[tuple[str, str]]:
    """Return the (channel, payload) notifications sent so far, in commit order.

    A sentinel sent from another session after everything else marks the end:
    notifications arrive in commit order.
    """
    with psycopg.connect(dsn, autocommit=True) as other:
        other.execute("SELECT pg_notify('batch_work', %s)", (SENTINEL,))
    got: list[tuple[str, str]] = []
    for notify in conn.notifies(timeout=10):
        if notify.payload == SENTINEL:
            return got
        got.append((notify.channel, notify.payload))
    raise AssertionError(f"the sentinel never arrived; heard {got}")


# Payload parsing.


def test_parse_work_accepts_only_a_canonical_uuid() -> None:
    batch_id = uuid.uuid4()

    assert parse_work(str(batch_id)) == batch_id
    for bad in ["", "garbage", "{" + str(batch_id) + "}", str(batch_id)[:-1] + "x"]:
        assert parse_work(bad) is None
    assert parse_work(str(batch_id).replace("-", "")) is None
    assert parse_work("'); DROP TABLE documents; --") is None


def test_parse_finished_reads_the_trigger_payload_and_rejects_the_rest() -> None:
    batch_id = uuid.uuid4()
    good = (
        f'{{"batch_id": "{batch_id}", "status": "completed", "total_documents": 3,'
        ' "completed_count": 3, "failed_count": 0}'
    )

    assert parse_finished(good) == BatchFinished(batch_id, "completed", 3, 3, 0)
    for bad in [
        "",
        "[]",
        "not json",
        '{"status": "completed"}',
        f'{{"batch_id": "{batch_id}"}}',
        f'{{"batch_id": "{batch_id}", "status": 7}}',
        f'{{"batch_id": "{batch_id}", "status": "x", "failed_count": "many"}}',
        '{"batch_id": 12, "status": "completed"}',
    ]:
        assert parse_finished(bad) is None, bad


def test_listen_options_keep_keepalives_the_dsn_sets() -> None:
    options = listen_options("postgresql://h/db?keepalives_idle=60")

    assert "keepalives_idle" not in options
    assert options["keepalives_interval"] > 0
    assert options["application_name"] == APPLICATION_NAME


# What the triggers send.


def test_thousand_documents_in_one_statement_send_one_notification(
    listening: psycopg.Connection[Any], dsn: str
) -> None:
    batch_id = make_batch(listening, n_docs=0, status="processing")
    heard(listening, dsn)

    listening.execute(
        "INSERT INTO documents (batch_id, user_id, file_name, content)"
        " SELECT %s, 'u1', 'd' || i, 'x' FROM generate_series(1, 1000) AS i",
        (batch_id,),
    )

    assert heard(listening, dsn) == [("batch_work", str(batch_id))]


def test_batch_inserted_with_its_documents_sends_one_notification(
    listening: psycopg.Connection[Any], dsn: str
) -> None:
    batch_id = make_batch(listening, n_docs=1000)

    assert heard(listening, dsn) == [("batch_work", str(batch_id))]


def test_documents_of_two_batches_in_one_statement_notify_each_batch_once(
    listening: psycopg.Connection[Any], dsn: str
) -> None:
    first = make_batch(listening, n_docs=0, status="processing")
    second = make_batch(listening, n_docs=0, status="processing")
    heard(listening, dsn)

    listening.execute(
        "INSERT INTO documents (batch_id, user_id, file_name)"
        " SELECT b, 'u1', 'd' || i FROM unnest(%s::uuid[]) AS b,"
        " generate_series(1, 50) AS i",
        ([first, second],),
    )

    assert sorted(heard(listening, dsn)) == sorted(
        [("batch_work", str(first)), ("batch_work", str(second))]
    )


def test_uploading_batch_sends_nothing_until_it_is_queued(
    listening: psycopg.Connection[Any], dsn: str
) -> None:
    batch_id = make_batch(listening, n_docs=5, status="uploading")
    listening.execute(
        "INSERT INTO documents (batch_id, user_id, file_name) VALUES (%s, 'u1', 'x')",
        (batch_id,),
    )
    assert heard(listening, dsn) == []

    listening.execute(
        "UPDATE extraction_batches SET status = 'queued' WHERE id = %s", (batch_id,)
    )

    assert heard(listening, dsn) == [("batch_work", str(batch_id))]


def test_claims_and_completions_send_no_work_notification(
    listening: psycopg.Connection[Any], dsn: str
) -> None:
    """Only work becoming due notifies; the traffic of processing it does not."""
    make_batch(listening, n_docs=3)
    heard(listening, dsn)
    claimed = listening.execute(
        "SELECT document_id, lease_token FROM claim_batch('w', 2, 60)"
    ).fetchall()

    listening.execute(
        "SELECT * FROM finish_documents(%s, %s, %s, %s::jsonb, %s)",
        (
            [d for d, _ in claimed],
            [t for _, t in claimed],
            ["completed", "error"],
            "[{}, null]",
            [None, "boom"],
        ),
    )

    assert heard(listening, dsn) == []


def test_requeue_batch_notifies_batch_work_once(
    listening: psycopg.Connection[Any], dsn: str
) -> None:
    batch_id = make_batch(listening, n_docs=3)
    listening.execute("SELECT cancel_batch(%s)", (batch_id,))
    heard(listening, dsn)

    listening.execute("SELECT requeue_batch(%s)", (batch_id,))

    assert heard(listening, dsn) == [("batch_work", str(batch_id))]


def test_cancel_batch_notifies_batch_finished(
    listening: psycopg.Connection[Any], dsn: str
) -> None:
    batch_id = make_batch(listening, n_docs=3)
    heard(listening, dsn)

    listening.execute("SELECT cancel_batch(%s)", (batch_id,))

    [(channel, payload)] = heard(listening, dsn)
    assert channel == "batch_finished"
    assert parse_finished(payload) == BatchFinished(batch_id, "cancelled", 3, 0, 3)


def test_request_sweep_notifies_batch_sweep(conn: psycopg.Connection[Any]) -> None:
    conn.execute("LISTEN batch_sweep")

    conn.execute("SELECT request_sweep()")

    [notify] = list(conn.notifies(timeout=5, stop_after=1))
    assert notify.channel == "batch_sweep"


# The Listener.


class Recorder:
    """Handlers that keep what they were given, and events to wait on."""

    def __init__(self) -> None:
        self.work: list[uuid.UUID] = []
        self.sweeps = 0
        self.finished: list[BatchFinished] = []
        self.connects: list[bool] = []
        self.changed = anyio.Event()

    def handlers(self) -> Handlers:
        return Handlers(
            on_work=lambda batch_id: self._add(self.work, batch_id),
            on_sweep=self._sweep,
            on_finished=lambda finished: self._add(self.finished, finished),
            on_connected=lambda again: self._add(self.connects, again),
        )

    def _add(self, items: list[Any], item: Any) -> None:
        items.append(item)
        self._changed()

    def _sweep(self) -> None:
        self.sweeps += 1
        self._changed()

    def _changed(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    async def until(self, condition: Any, timeout: float = 10) -> None:
        with anyio.fail_after(timeout):
            while not condition():
                await self.changed.wait()


@asynccontextmanager
async def running_listener(
    dsn: str, settings: ListenSettings | None = None
) -> AsyncIterator[tuple[Listener, Recorder]]:
    recorder = Recorder()
    listener = Listener(dsn, recorder.handlers(), settings)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(listener.run)
        await recorder.until(lambda: recorder.connects)
        yield listener, recorder
        tasks.cancel_scope.cancel()


async def notify(dsn: str, channel: str, *payloads: str) -> None:
    """Send payloads on channel, each in its own transaction."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for payload in payloads:
            await conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


async def terminate_listen_backend(dsn: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = %s",
            (APPLICATION_NAME,),
        )
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


@pytest.mark.anyio
async def test_listener_hands_each_channel_to_its_handler(dsn: str) -> None:
    batch_id = uuid.uuid4()
    async with running_listener(dsn) as (_, recorder):
        assert recorder.connects == [False]

        await notify(dsn, "batch_work", str(batch_id))
        await notify(dsn, "batch_sweep", "")
        await notify(
            dsn,
            "batch_finished",
            f'{{"batch_id": "{batch_id}", "status": "failed", "total_documents": 1,'
            ' "completed_count": 0, "failed_count": 1}',
        )
        await recorder.until(lambda: recorder.finished)

    assert recorder.work == [batch_id]
    assert recorder.sweeps == 1
    assert recorder.finished == [BatchFinished(batch_id, "failed", 1, 0, 1)]


@pytest.mark.anyio
async def test_listener_ignores_thousands_of_garbage_payloads(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="listener.listen")
    garbage = [f"junk {i} '; DROP TABLE documents; --" for i in range(2000)]
    garbage += ["", "x" * 7999, "{" + str(uuid.uuid4()) + "}", "\\x00"]
    batch_id = uuid.uuid4()
    async with running_listener(dsn) as (_, recorder):
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            for channel in ("batch_work", "batch_finished"):
                await conn.execute(
                    "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p",
                    (channel, garbage),
                )
            await conn.commit()
        await notify(dsn, "batch_work", str(batch_id))

        await recorder.until(lambda: recorder.work)

    assert recorder.work == [batch_id]
    assert recorder.finished == []
    ignored = [r for r in caplog.records if "ignored malformed" in r.getMessage()]
    assert len(ignored) == 2 * len(garbage)
    assert all(r.levelno == logging.DEBUG for r in ignored)


@pytest.mark.anyio
async def test_listener_reconnects_after_pg_terminate_backend(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="listener.listen")
    batch_id = uuid.uuid4()
    recoveries: list[float] = []
    async with running_listener(dsn) as (listener, recorder):
        for _ in range(3):
            # Not an assertion: a connection younger than the backoff cap counts
            # as flapping, and its successor waits out a backoff.
            await anyio.sleep(listener.settings.backoff_cap + 0.1)
            killed_at = time.perf_counter()
            before = len(recorder.connects)
            assert await terminate_listen_backend(dsn) == 1

            await recorder.until(lambda n=before: len(recorder.connects) > n)
            recoveries.append(time.perf_counter() - killed_at)

        await notify(dsn, "batch_work", str(batch_id))
        await recorder.until(lambda: recorder.work)

    assert recorder.connects == [False] + [True] * 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    print(
        f"\nLISTEN reconnect after pg_terminate_backend: median "
        f"{statistics.median(recoveries) * 1000:.1f} ms, "
        f"max {max(recoveries) * 1000:.1f} ms"
    )


# A TCP proxy between the Listener and the server, to cut or freeze its link.


class Proxy:
    """Forward TCP connections to PostgreSQL; freeze them, or refuse new ones."""

    def __init__(self, upstream_dsn: str) -> None:
        params = conninfo_to_dict(upstream_dsn)
        self.upstream_host = str(params.get("host") or "localhost")
        self.upstream_port = int(params.get("port") or 5432)
        self.upstream_dsn = upstream_dsn
        self.refusing = False
        self.accepted = 0
        self._frozen: set[asyncio.StreamWriter] = set()
        self._open: set[asyncio.StreamWriter] = set()
        self._thaw = asyncio.Event()
        self._server: asyncio.Server | None = None

    @property
    def dsn(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return make_conninfo(
            self.upstream_dsn, host="127.0.0.1", port=port, sslmode="disable"
        )

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        self.cut_all()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def freeze_all(self) -> None:
        """Stop forwarding on every open connection, leaving its sockets open."""
        self._frozen |= self._open

    def cut_all(self) -> None:
        for writer in list(self._open):
            writer.transport.abort()

    async def _upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.upstream_host.startswith("/"):
            path = f"{self.upstream_host}/.s.PGSQL.{self.upstream_port}"
            return await asyncio.open_unix_connection(path)
        return await asyncio.open_connection(self.upstream_host, self.upstream_port)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        self.accepted += 1
        up_reader, up_writer = await self._upstream()
        self._open |= {writer, up_writer}
        try:
            await asyncio.gather(
                self._pump(reader, up_writer, writer),
                self._pump(up_reader, writer, up_writer),
            )
        except (ConnectionError, OSError):
            pass
        finally:
            for w in (writer, up_writer):
                self._open.discard(w)
                self._frozen.discard(w)
                w.transport.abort()

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        source_writer: asyncio.StreamWriter,
    ) -> None:
        while data := await source.read(65536):
            if source_writer in self._frozen:
                # Hold the data for good: the peer sees a silent, open socket.
                await asyncio.Event().wait()
            sink.write(data)
            await sink.drain()
        sink.transport.abort()


@pytest.fixture
async def proxy(dsn: str) -> AsyncIterator[Proxy]:
    running = Proxy(dsn)
    await running.start()
    yield running
    await running.close()


FAST = ListenSettings(idle_probe_seconds=1.0, probe_timeout=1.0)


@pytest.mark.anyio
async def test_listener_notices_a_silent_half_open_connection(
    proxy: Proxy, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A frozen link never errors; the idle probe finds it and reconnects."""
    caplog.set_level(logging.WARNING)
    batch_id = uuid.uuid4()
    async with running_listener(proxy.dsn, FAST) as (_, recorder):
        frozen_at = time.perf_counter()
        proxy.freeze_all()

        await recorder.until(lambda: len(recorder.connects) == 2, timeout=15)
        detected = time.perf_counter() - frozen_at
        await notify(dsn, "batch_work", str(batch_id))
        await recorder.until(lambda: recorder.work)

    assert recorder.connects == [False, True]
    assert recorder.work == [batch_id]
    # One warning for the outage: none from psycopg about interrupting the probe.
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.name for r in warnings] == ["listener.listen"]
    print(f"\nhalf-open LISTEN connection replaced after {detected:.2f} s")


@pytest.mark.anyio
async def test_listener_backs_off_while_refused_and_warns_once_per_outage(
    proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="listener.listen")
    async with running_listener(proxy.dsn, FAST) as (_, recorder):
        proxy.refusing = True
        cut_at = time.perf_counter()
        proxy.cut_all()
        attempts_before = proxy.accepted
        with anyio.fail_after(10):
            while (
                sum("reconnect attempt" in r.getMessage() for r in caplog.records) < 4
            ):
                await anyio.sleep(0.05)
        outage = time.perf_counter() - cut_at

        proxy.refusing = False
        await recorder.until(lambda: len(recorder.connects) == 2)

    assert proxy.accepted == attempts_before + 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "lost" in warnings[0]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1
    assert "restored" in infos[0]
    # Five tries (one at once, four backed off) spread over the outage.
    assert outage > FAST.backoff_base * (1 + 2 + 4) / 2


def test_backoff_grows_with_jitter_up_to_its_cap() -> None:
    settings = ListenSettings(backoff_base=0.1, backoff_cap=1.0)

    delays = [settings.backoff(n) for n in range(1, 12)]

    assert settings.backoff(0) == 0
    assert 0.05 <= delays[0] <= 0.1
    assert all(0.5 <= d <= 1.0 for d in delays[5:])
    assert len({round(settings.backoff(8), 6) for _ in range(20)}) > 1


def test_documents_inserted_with_triggers_suppressed_are_counted_but_not_announced(
    listening: psycopg.Connection[Any], dsn: str
) -> None:
    """session_replication_role = replica skips the hints, never the counters."""
    with listening.transaction():
        listening.execute("SET LOCAL session_replication_role = replica")
        batch_id = make_batch(listening, n_docs=5)

    assert heard(listening, dsn) == []
    row = listening.execute(
        "SELECT total_documents FROM extraction_batches WHERE id = %s", (batch_id,)
    ).fetchone()
    assert row == (5,)
