"""The LISTEN connection and its reconnect loop.

One dedicated connection, never from the pool: LISTEN belongs to a session and
does not survive transaction pooling. Notifications are wake-up hints only;
their payloads are validated here and never reach SQL.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, NoReturn
from uuid import UUID

import anyio
import orjson
import psycopg

from listener.config import describe_dsn
from listener.db import connect, keepalive_options
from listener.errors import DatabaseUnavailable, ListenerError
from listener.metrics import METRICS

log = logging.getLogger(__name__)

WORK_CHANNEL = "batch_work"
SWEEP_CHANNEL = "batch_sweep"
FINISHED_CHANNEL = "batch_finished"
# Fixed names only: LISTEN takes no parameters, so nothing variable is spliced in.
_LISTEN = "LISTEN batch_work; LISTEN batch_sweep; LISTEN batch_finished"

# Shown in pg_stat_activity, so an operator can tell it from the work pool.
APPLICATION_NAME = "listener-listen"


@dataclass(frozen=True, slots=True)
class ListenSettings:
    """How the LISTEN connection notices that it is dead, and how it reconnects.

    A connection silent for idle_probe_seconds gets a `SELECT 1` that must
    answer within probe_timeout: this finds a half-open connection that the
    kernel cannot, such as a peer whose TCP stack still answers.
    """

    idle_probe_seconds: float = 3.0
    probe_timeout: float = 2.0
    backoff_base: float = 0.1
    backoff_cap: float = 1.0

    def backoff(self, failures: int) -> float:
        """Return the delay before reconnect attempt number failures + 1, jittered."""
        if failures <= 0:
            return 0.0
        ceiling = min(self.backoff_cap, self.backoff_base * 2 ** (failures - 1))
        return random.uniform(ceiling / 2, ceiling)


@dataclass(frozen=True, slots=True)
class BatchFinished:
    """A batch_finished notification: a batch reached a terminal state."""

    batch_id: UUID
    status: str
    total_documents: int
    completed_count: int
    failed_count: int


@dataclass(frozen=True, slots=True)
class Handlers:
    """What to do with each kind of notification, and after every (re)connect.

    Handlers run on the event loop and must not block: they raise flags.
    on_connected(reconnected) runs once LISTEN is in place, so whatever was
    committed before it is for a sweep to find, and everything after it is
    announced.
    """

    on_work: Callable[[UUID], None]
    on_sweep: Callable[[], None]
    on_finished: Callable[[BatchFinished], None]
    on_connected: Callable[[bool], None]


class ConnectionLost(ListenerError):
    """The LISTEN connection stopped answering."""


def parse_work(payload: object) -> UUID | None:
    """Return the batch id a batch_work payload names, or None if it is malformed."""
    # The canonical text form only: uuid.UUID also accepts braces and URNs.
    if not isinstance(payload, str) or len(payload) != 36:
        return None
    try:
        return UUID(payload)
    except ValueError:
        return None


def parse_finished(payload: str) -> BatchFinished | None:
    """Return the batch_finished payload as a BatchFinished, or None if malformed."""
    try:
        data: Any = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    batch_id = parse_work(data.get("batch_id"))
    status = data.get("status")
    counts = [
        data.get(key, 0)
        for key in ("total_documents", "completed_count", "failed_count")
    ]
    if batch_id is None or not isinstance(status, str):
        return None
    if not all(type(count) is int for count in counts):
        return None
    return BatchFinished(batch_id, status, counts[0], counts[1], counts[2])


def listen_options(dsn: str) -> dict[str, Any]:
    """Return the connection options of the LISTEN connection for this DSN."""
    return {"application_name": APPLICATION_NAME, **keepalive_options(dsn)}


class Listener:
    """Hold a LISTEN connection open for good, reconnecting whenever it dies."""

    def __init__(
        self, dsn: str, handlers: Handlers, settings: ListenSettings | None = None
    ) -> None:
        self._dsn = dsn
        self._handlers = handlers
        self.settings = settings or ListenSettings()
        self.connections = 0

    async def run(self) -> NoReturn:
        """Listen until cancelled; never returns, never raises for a lost connection."""
        failures = 0
        lost_at: float | None = None
        while True:
            await anyio.sleep(self.settings.backoff(failures))
            try:
                conn = await self._open()
            except (DatabaseUnavailable, psycopg.Error) as exc:
                failures += 1
                if lost_at is None:
                    lost_at = time.monotonic()
                    log.warning("cannot LISTEN, retrying with backoff: %s", exc)
                else:
                    log.debug("reconnect attempt %d failed: %s", failures, exc)
                continue

            if lost_at is not None:
                log.info(
                    "LISTEN connection restored after %.2f s",
                    time.monotonic() - lost_at,
                )
            self.connections += 1
            connected_at = time.monotonic()
            try:
                self._handlers.on_connected(self.connections > 1)
                await self._receive(conn)
            except (psycopg.Error, ConnectionLost) as exc:
                log.warning(
                    "LISTEN connection lost, reconnecting: %s", _first_line(exc)
                )
            finally:
                METRICS.set_listening(False)
                await _close_quietly(conn)

            lost_at = time.monotonic()
            # A connection that dies as soon as it is made keeps backing off.
            stable = lost_at - connected_at > self.settings.backoff_cap
            failures = 0 if stable else failures + 1

    async def _open(self) -> psycopg.AsyncConnection[Any]:
        conn = await connect(self._dsn, **listen_options(self._dsn))
        try:
            await conn.execute(_LISTEN)
        except BaseException:
            await _close_quietly(conn)
            raise
        log.debug("LISTEN on %s", describe_dsn(self._dsn))
        return conn

    async def _receive(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Dispatch notifications until the connection fails or stops answering."""
        heard_at = time.monotonic()
        while True:
            quiet_for = self.settings.idle_probe_seconds - (time.monotonic() - heard_at)
            if quiet_for <= 0:
                await self._probe(conn)
                heard_at = time.monotonic()
                continue
            async with aclosing(conn.notifies(timeout=quiet_for)) as notifies:
                async for notify in notifies:
                    heard_at = time.monotonic()
                    self._dispatch(notify.channel, notify.payload)

    async def _probe(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Raise unless `SELECT 1` answers within probe_timeout."""
        answered = anyio.Event()
        failures: list[psycopg.Error] = []

        async def ask() -> None:
            try:
                await conn.execute("SELECT 1")
            except psycopg.Error as exc:
                failures.append(exc)
            answered.set()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(ask)
            with anyio.move_on_after(self.settings.probe_timeout):
                await answered.wait()
            if not answered.is_set():
                # Closed before the query is interrupted, psycopg drops it quietly
                # instead of sending a cancel request to a server that is silent.
                conn.pgconn.finish()
                tasks.cancel_scope.cancel()
        if failures:
            raise failures[0]
        if not answered.is_set():
            raise ConnectionLost(
                f"no answer to a probe within {self.settings.probe_timeout:g} s"
            )

    def _dispatch(self, channel: str, payload: str) -> None:
        try:
            if channel == WORK_CHANNEL:
                batch_id = parse_work(payload)
                if batch_id is None:
                    log.debug("ignored malformed %s payload %.80r", channel, payload)
                    return
                log.debug("work for batch %s", batch_id)
                self._handlers.on_work(batch_id)
            elif channel == SWEEP_CHANNEL:
                log.debug("sweep requested")
                self._handlers.on_sweep()
            elif channel == FINISHED_CHANNEL:
                finished = parse_finished(payload)
                if finished is None:
                    log.debug("ignored malformed %s payload %.80r", channel, payload)
                    return
                self._handlers.on_finished(finished)
        except Exception:
            log.exception("handling a %s notification failed; ignored", channel)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


async def _close_quietly(conn: psycopg.AsyncConnection[Any]) -> None:
    with anyio.move_on_after(1, shield=True):
        try:
            await conn.close()
        except psycopg.Error:
            log.debug("closing a dead LISTEN connection failed", exc_info=True)
