"""The always-on listener, `listener run`: notifications in, claims out.

Tasks of one Service, all on one event loop:
- the Listener holds the LISTEN connection and raises flags;
- the claim loop claims while there is work and free capacity;
- the sweeper recovers dead workers' documents on start, after every
  reconnect, every sweep interval and on request_sweep();
- the retry timer wakes the claim loop when a retried document falls due;
- the Engine extracts, records outcomes and extends leases.

Every wake-up is a flag: a burst of notifications costs one claim, and the
claim reads the tables, so a lost notification costs latency, never work.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import signal
import sys
import time
from datetime import datetime
from typing import Any
from uuid import UUID

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool

from listener import claim as claims_db
from listener.claim import Claim
from listener.config import ProcessingSettings, describe_dsn, worker_name
from listener.db import open_pool
from listener.extractors import Extractor
from listener.listen import BatchFinished, Handlers, Listener, ListenSettings
from listener.metrics import METRICS
from listener.sweep import recover
from listener.worker import Engine

log = logging.getLogger(__name__)

# Claim loop, flusher, heartbeat and sweeper each hold at most one connection.
POOL_SIZE = 4
# How long the pool check after a reconnect may take.
POOL_CHECK_SECONDS = 5.0
# Wake a little after a retry is due, so that the claim finds it due.
RETRY_MARGIN = 0.02


class Wakeup:
    """A flag that any number of set() calls raise and one wait() lowers."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        """Raise the flag; wakes the waiter, if any, once."""
        self._event.set()

    async def wait(self) -> None:
        """Return once the flag is raised, and lower it."""
        await self._event.wait()
        self._event = anyio.Event()


class Service:
    """One listener process's work: LISTEN, claim, extract, sweep."""

    def __init__(
        self,
        dsn: str,
        extractor: Extractor,
        settings: ProcessingSettings,
        *,
        sweep_interval: float,
        shutdown_grace: float,
        worker: str | None = None,
        listen_settings: ListenSettings | None = None,
    ) -> None:
        self.dsn = dsn
        self.settings = settings
        self.worker = worker or worker_name()
        self.sweep_interval = sweep_interval
        self.shutdown_grace = shutdown_grace
        self.ready = anyio.Event()
        # Claims made, and sweeps run, since start; logged at exit.
        self.claims = 0
        self.sweeps = 0
        self._extractor = extractor
        self._listener = Listener(
            dsn,
            Handlers(
                on_work=self._on_work,
                on_sweep=self._on_sweep,
                on_finished=self._on_finished,
                on_connected=self._on_connected,
            ),
            listen_settings,
        )
        self._claim_wanted = Wakeup()
        self._sweep_wanted = Wakeup()
        self._retries_changed = Wakeup()
        self._stop_wanted = anyio.Event()
        self._claim_lock = anyio.Lock()
        self._stopping = False
        self._check_pool = False
        self._retries: list[float] = []
        # Database clock minus ours, in seconds; retry times are the database's.
        self._clock_offset = 0.0
        self._engine: Engine | None = None
        # When the first batch_work since the last successful claim arrived.
        self._notified_at: float | None = None

    @property
    def engine(self) -> Engine:
        """Return the running Engine."""
        if self._engine is None:
            raise RuntimeError("the service is not running")
        return self._engine

    def request_stop(self) -> bool:
        """Stop claiming, let documents in flight finish, hand back the rest.

        Returns False if a stop had been requested already.
        """
        if self._stop_wanted.is_set():
            return False
        self._stop_wanted.set()
        return True

    async def run(self) -> None:
        """Serve until request_stop(); then shut down gracefully and return.

        :raises DatabaseUnavailable: the database cannot be reached at start.
        """
        pool = await open_pool(self.dsn, size=POOL_SIZE)
        try:
            await self._serve(pool)
        finally:
            with anyio.CancelScope(shield=True):
                await pool.close()

    async def _serve(self, pool: AsyncConnectionPool) -> None:
        engine = Engine(
            pool,
            self._extractor,
            self.settings,
            self.worker,
            on_retry=self._on_retry,
            on_recorded=self._claim_wanted.set,
        )
        self._engine = engine
        METRICS.track_in_flight(lambda: engine.in_flight)
        try:
            async with anyio.create_task_group() as tasks:
                await engine.serve(tasks)
                tasks.start_soon(self._sweep_forever)
                tasks.start_soon(self._claim_forever)
                tasks.start_soon(self._wake_at_retries)
                tasks.start_soon(self._listener.run)
                tasks.start_soon(METRICS.beat_forever)

                await self._stop_wanted.wait()
                await self._shut_down()
                tasks.cancel_scope.cancel()
        finally:
            engine.close()

    async def _shut_down(self) -> None:
        engine = self.engine
        log.info(
            "stopping: no more claims; %d documents in flight get %g s to finish",
            engine.in_flight,
            self.shutdown_grace,
        )
        self._stopping = True
        self._claim_wanted.set()
        # A claim under way finishes, so that its documents are ours to hand back.
        with anyio.move_on_after(max(self.shutdown_grace, 1.0)):
            async with self._claim_lock:
                pass
        await engine.stop(self.shutdown_grace)
        tally = engine.tally
        log.info(
            "stopped: %d claims, %d sweeps; %d documents completed, %d failed, "
            "%d retried, %d handed back",
            self.claims,
            self.sweeps,
            tally.completed,
            tally.failed,
            tally.retried,
            tally.released,
        )

    # Notification handlers: they only raise flags.

    def _on_work(self, batch_id: UUID) -> None:
        if self._notified_at is None:
            self._notified_at = time.monotonic()
        self._claim_wanted.set()

    def _on_sweep(self) -> None:
        self._sweep_wanted.set()

    def _on_connected(self, reconnected: bool) -> None:
        METRICS.set_listening(True, reconnected=reconnected)
        # Work committed while nobody listened was never announced.
        self._check_pool = self._check_pool or reconnected
        self._sweep_wanted.set()

    def _on_finished(self, finished: BatchFinished) -> None:
        log.info(
            "batch %s %s: %d of %d documents completed, %d failed",
            finished.batch_id,
            finished.status,
            finished.completed_count,
            finished.total_documents,
            finished.failed_count,
            extra={"batch_id": str(finished.batch_id), "status": finished.status},
        )
        if finished.status == "cancelled" and self._engine is not None:
            # Its documents' leases are revoked: do not extract those we hold.
            self._engine.check_leases()

    def _on_retry(self, due_at: datetime) -> None:
        heapq.heappush(self._retries, due_at.timestamp() - self._clock_offset)
        self._retries_changed.set()

    # The claim loop.

    async def _claim_forever(self) -> None:
        while not self._stopping:
            await self._claim_wanted.wait()
            await self._claim_while_work()

    async def _claim_while_work(self) -> None:
        """Claim until a claim comes back empty or capacity runs out.

        When capacity runs out, the next flush raises the flag again.
        """
        engine = self.engine
        while not self._stopping and engine.free_capacity > 0:
            size = min(engine.free_capacity, self.settings.claim_size)
            try:
                claims = await self._claim(size)
            except psycopg.Error as exc:
                # A reconnect, the next flush or the next sweep raises the flag.
                log.warning("claiming failed, waiting for the next wake-up: %s", exc)
                return
            if not claims:
                return

    async def _claim(self, size: int) -> list[Claim]:
        """Claim up to size documents and submit them to the engine."""
        async with self._claim_lock:
            if self._stopping:
                return []
            self.claims += 1
            claims: list[Claim] = await self.engine.call_db(
                lambda conn: claims_db.claim_batch(
                    conn,
                    self.worker,
                    size,
                    self.settings.lease_seconds,
                    max_content_bytes=self.settings.max_content_bytes,
                ),
                "claim documents",
            )
            # Under the lock: shutdown waits for it, then hands these back.
            self.engine.submit(claims)
        if claims:
            METRICS.record_claim(len(claims), self._notified_at)
            self._notified_at = None
        log.debug("claimed %d of %d documents", len(claims), size)
        return claims

    # The sweeper.

    async def _sweep_forever(self) -> None:
        interval = self.sweep_interval if self.sweep_interval > 0 else math.inf
        while True:
            with anyio.move_on_after(interval):
                await self._sweep_wanted.wait()
            await self._sweep()

    async def _sweep(self) -> None:
        """Recover dead workers' documents, then let the claim loop find all work."""
        engine = self.engine
        if self._check_pool:
            # After an outage the idle pool connections are likely dead too.
            self._check_pool = False
            # check() waits on every idle connection; a stalled one must not
            # hold the sweep (keepalives fail it within seconds anyway).
            with anyio.move_on_after(POOL_CHECK_SECONDS):
                await engine.pool.check()
        try:
            await engine.call_db(self._recover, "sweep")
        except psycopg.Error as exc:
            if not self.ready.is_set():
                raise
            log.warning("sweep failed, retrying at the next one: %s", exc)
        self.sweeps += 1
        self._claim_wanted.set()
        if not self.ready.is_set():
            self.ready.set()
            log.info(
                "listener %s ready on %s: concurrency %d, lease %g s, sweep every %g s",
                self.worker,
                describe_dsn(self.dsn),
                self.settings.concurrency,
                self.settings.lease_seconds,
                self.sweep_interval,
            )

    async def _recover(self, conn: psycopg.AsyncConnection[Any]) -> None:
        METRICS.record_sweep(await recover(conn, self.settings.max_attempts))
        before = time.time()
        cursor = await conn.execute("SELECT clock_timestamp()")
        row = await cursor.fetchone()
        after = time.time()
        if row is not None:
            db_now: datetime = row[0]
            self._clock_offset = db_now.timestamp() - (before + after) / 2

    # The retry timer.

    async def _wake_at_retries(self) -> None:
        while True:
            now = time.time()
            if self._retries and self._retries[0] + RETRY_MARGIN <= now:
                while self._retries and self._retries[0] + RETRY_MARGIN <= now:
                    heapq.heappop(self._retries)
                self._claim_wanted.set()
            wait = self._retries[0] + RETRY_MARGIN - now if self._retries else math.inf
            with anyio.move_on_after(wait):
                await self._retries_changed.wait()


def run_listener(
    dsn: str,
    extractor: Extractor,
    settings: ProcessingSettings,
    *,
    sweep_interval: float,
    shutdown_grace: float,
) -> int:
    """Run `listener run` until SIGTERM or SIGINT; return the exit code.

    The first signal stops claiming and shuts down within shutdown_grace
    seconds (exit 0); a second one exits at once with 128 + its number.
    """
    service = Service(
        dsn,
        extractor,
        settings,
        sweep_interval=sweep_interval,
        shutdown_grace=shutdown_grace,
    )
    # Extractor threads still running past the grace are abandoned by the CLI,
    # which exits without waiting for them.
    anyio.run(_run_until_signalled, service, backend="asyncio")
    return 0


async def _run_until_signalled(service: Service) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_watch_signals, signals, service)
            await service.run()
            tasks.cancel_scope.cancel()


async def _watch_signals(signals: Any, service: Service) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if service.request_stop():
            log.info("%s received: shutting down", name)
            continue
        log.warning(
            "second signal (%s): exiting at once; documents in flight come back "
            "when their leases expire",
            name,
        )
        _exit_now(128 + signum)


def _exit_now(code: int) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
