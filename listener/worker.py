"""Run claimed documents through the extractor and record their outcomes.

The Engine is shared by `listener sweep` and `listener run`: callers claim and
submit; the engine extracts with bounded concurrency, records outcomes in
group commits (one round trip for everything finished since the last one),
and extends the leases of everything it holds.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

import anyio
import anyio.lowlevel
import psycopg
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from psycopg_pool import AsyncConnectionPool

from listener import claim as claims_db
from listener.claim import Claim, Finished
from listener.config import ProcessingSettings
from listener.extractors import Extractor, Outcome, run_extractor
from listener.metrics import METRICS

log = logging.getLogger(__name__)

# Largest group of outcomes recorded in one finish_documents call.
MAX_FLUSH = 1000
# Without a fixed prefetch, the engine holds enough claimed documents for
# PREFETCH_SECONDS of work at the rate it records them (at least concurrency,
# at most PREFETCH_CAP): a slow extractor holds twice --concurrency, as
# before, while cheap ones are never starved by claim round trips.
PREFETCH_SECONDS = 0.25
PREFETCH_CAP = 5000
# The recording rate is measured over this many seconds.
RATE_WINDOW = 1.0
MIN_RATE_SPAN = 0.05
# An extraction worker that takes claims without waiting lets the other tasks
# (heartbeats, the LISTEN connection, claims) run after this many claims, or
# sooner once this many seconds have passed: an async extractor that never
# awaits does not hold up the event loop for 64 of its documents.
YIELD_EVERY = 64
YIELD_SECONDS = 0.005
T = TypeVar("T")


@dataclass(slots=True)
class Tally:
    """Counts of what the engine has done since it started."""

    completed: int = 0
    failed: int = 0
    retried: int = 0
    stale: int = 0
    released: int = 0
    lost: int = 0

    def add(self, finished: Sequence[Finished]) -> None:
        """Count the database's verdicts on one flush."""
        for item in finished:
            if item.kind == "completed":
                self.completed += 1
            elif item.kind == "failed":
                self.failed += 1
            elif item.kind == "retrying":
                self.retried += 1
            else:
                self.stale += 1


class Engine:
    """Extract submitted claims with bounded concurrency; record outcomes in batches."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        extractor: Extractor,
        settings: ProcessingSettings,
        worker: str,
        *,
        prefetch: int | None = None,
        on_retry: Callable[[datetime], None] | None = None,
        on_recorded: Callable[[], None] | None = None,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.worker = worker
        self.tally = Tally()
        self._prefetch = prefetch
        self._recorded: deque[tuple[float, int]] = deque()
        self._taken = 0
        self._yielded_at = time.monotonic()
        self._extractor = extractor
        self._on_retry = on_retry
        self._on_recorded = on_recorded
        self._in_flight: dict[UUID, Claim] = {}
        self._started: set[UUID] = set()
        self._pending: list[tuple[Claim, Outcome]] = []
        # The documents of the group being recorded: finish_documents holds
        # their row locks, so a heartbeat that included them would wait for
        # it, and the leases of everything else would run out meanwhile.
        self._recording: set[UUID] = set()
        self._stopping = False
        self._flush_wanted = anyio.Event()
        self._heartbeat_wanted = anyio.Event()
        self._changed = anyio.Event()
        self._send: MemoryObjectSendStream[Claim]
        self._receive: MemoryObjectReceiveStream[Claim]
        self._send, self._receive = anyio.create_memory_object_stream[Claim](math.inf)

    @property
    def in_flight(self) -> int:
        """Return how many claimed documents are not recorded yet."""
        return len(self._in_flight)

    @property
    def limit(self) -> int:
        """Return how many documents may be held (claimed, not recorded) at once."""
        concurrency = self.settings.concurrency
        if self._prefetch is not None:
            return concurrency + self._prefetch
        wanted = int(self._recording_rate() * PREFETCH_SECONDS)
        return concurrency + min(max(wanted, concurrency), PREFETCH_CAP)

    def _recording_rate(self) -> float:
        """Return the documents recorded per second over the last RATE_WINDOW.

        Measured from the oldest flush in the window rather than over the
        whole window, so that the prefetch grows within a few flushes.
        """
        recorded = self._recorded
        now = time.monotonic()
        while recorded and recorded[0][0] < now - RATE_WINDOW:
            recorded.popleft()
        if not recorded:
            return 0.0
        span = max(now - recorded[0][0], MIN_RATE_SPAN)
        return sum(n for _, n in recorded) / span

    @property
    def free_capacity(self) -> int:
        """Return how many more documents may be claimed now."""
        return 0 if self._stopping else max(self.limit - len(self._in_flight), 0)

    def submit(self, claims: Sequence[Claim]) -> None:
        """Queue claimed documents for extraction."""
        for claim in claims:
            self._in_flight[claim.document.id] = claim
            self._send.send_nowait(claim)

    async def wait_for_capacity(self) -> None:
        """Return once at least one more document may be claimed."""
        while self.free_capacity <= 0 and not self._stopping:
            await self._wait_changed()

    async def drain(self) -> None:
        """Return once every submitted document has been recorded."""
        while self._in_flight:
            await self._wait_changed()

    async def _wait_changed(self) -> None:
        await self._changed.wait()

    def _signal_changed(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def serve(self, task_group: TaskGroup) -> None:
        """Start the extraction workers, the flusher and the heartbeat in task_group."""
        for _ in range(self.settings.concurrency):
            task_group.start_soon(self._extract_forever)
        task_group.start_soon(self._flush_forever)
        task_group.start_soon(self._heartbeat_forever)

    def close(self) -> None:
        """Close the queue of submitted documents; call once serve()'s tasks ended."""
        self._send.close()
        self._receive.close()

    def check_leases(self) -> None:
        """Extend the leases now, rather than at the next heartbeat.

        Unstarted documents whose lease is gone (cancel_batch revoked it, or it
        expired and the sweep gave the document to someone else) are dropped
        without being extracted.
        """
        self._heartbeat_wanted.set()

    async def _extract_forever(self) -> None:
        while (claim := await self._next_claim()) is not None:
            if self._in_flight.get(claim.document.id) is not claim:
                # Its lease was lost while it waited: someone else's now.
                continue
            if self._stopping:
                # Left unstarted in _in_flight: stop() hands it back.
                continue
            self._started.add(claim.document.id)
            began = time.perf_counter()
            outcome = await run_extractor(
                self._extractor, claim.document, self.settings.extract_timeout
            )
            METRICS.observe_extraction(time.perf_counter() - began, outcome.kind)
            # Only build the record's fields when DEBUG is on: this runs per document.
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "document %s attempt %d: %s",
                    claim.document.id,
                    claim.document.attempt,
                    outcome.kind,
                    extra={
                        "document_id": str(claim.document.id),
                        "batch_id": str(claim.document.batch_id),
                        "attempt": claim.document.attempt,
                        "duration_ms": round((time.perf_counter() - began) * 1000, 3),
                    },
                )
            self._pending.append((claim, outcome))
            self._flush_wanted.set()

    async def _next_claim(self) -> Claim | None:
        """Return the next submitted claim, or None once the queue is closed.

        Takes a waiting claim without a trip through the event loop, which
        would cost more than a cheap extraction, but still lets the other
        tasks run every YIELD_EVERY claims or YIELD_SECONDS.
        """
        self._taken += 1
        try:
            claim = self._receive.receive_nowait()
        except anyio.WouldBlock:
            try:
                claim = await self._receive.receive()
            except anyio.EndOfStream:
                return None
            self._yielded_at = time.monotonic()
            return claim
        except anyio.EndOfStream:
            return None
        if (
            self._taken % YIELD_EVERY == 0
            or time.monotonic() - self._yielded_at > YIELD_SECONDS
        ):
            await anyio.lowlevel.checkpoint()
            self._yielded_at = time.monotonic()
        return claim

    async def _flush_forever(self) -> None:
        while True:
            await self._flush_wanted.wait()
            self._flush_wanted = anyio.Event()
            while self._pending:
                group = self._pending[:MAX_FLUSH]
                del self._pending[:MAX_FLUSH]
                await self._record(group)

    async def _record(self, group: list[tuple[Claim, Outcome]]) -> None:
        self._recording = {claim.document.id for claim, _ in group}
        try:
            finished = await self._finish_contained(group)
        except psycopg.OperationalError:
            # Past the lease time our leases are gone anyway: the sweep hands
            # these documents to another try, and nothing was charged.
            log.error(
                "could not record %d outcomes, database unreachable; their "
                "documents come back when their leases expire",
                len(group),
            )
            finished = []
        finally:
            self._recording = set()
        self.tally.add(finished)
        self._recorded.append((time.monotonic(), len(group)))
        METRICS.record_outcomes(finished)
        for item in finished:
            if item.kind == "stale":
                log.warning(
                    "document %s: outcome refused, its lease is no longer ours "
                    "(revoked or taken over, or already recorded by a retried "
                    "call whose reply was lost); nothing charged twice",
                    item.document_id,
                    extra={"document_id": str(item.document_id)},
                )
            elif item.kind == "retrying" and item.due_at and self._on_retry:
                self._on_retry(item.due_at)
        for claim, _ in group:
            self._in_flight.pop(claim.document.id, None)
            self._started.discard(claim.document.id)
        self._signal_changed()
        if self._on_recorded:
            self._on_recorded()

    async def _finish_contained(
        self, group: list[tuple[Claim, Outcome]]
    ) -> list[Finished]:
        """Record a group; isolate an outcome the database refuses to store."""
        try:
            recorded: list[Finished] = await self.call_db(
                lambda conn: claims_db.finish_documents(conn, group, self.settings),
                "record outcomes",
            )
            return recorded
        except psycopg.OperationalError:
            raise
        except psycopg.DatabaseError as exc:
            if len(group) == 1:
                claim = group[0][0]
                log.warning(
                    "document %s: outcome could not be stored (%s); failing it",
                    claim.document.id,
                    type(exc).__name__,
                    extra={"document_id": str(claim.document.id)},
                )
                replacement = Outcome(
                    "failed", error=f"result could not be stored: {exc}"
                )
                failed: list[Finished] = await self.call_db(
                    lambda conn: claims_db.finish_documents(
                        conn, [(claim, replacement)], self.settings
                    ),
                    "record outcomes",
                )
                return failed
        finished: list[Finished] = []
        for item in group:
            finished.extend(await self._finish_contained([item]))
        return finished

    async def _heartbeat_forever(self) -> None:
        while True:
            with anyio.move_on_after(self.settings.heartbeat_seconds):
                await self._heartbeat_wanted.wait()
            self._heartbeat_wanted = anyio.Event()
            held = [
                c
                for c in self._in_flight.values()
                if c.document.id not in self._recording
            ]
            if not held:
                continue
            try:
                extended = await self.call_db(
                    functools.partial(
                        claims_db.extend_leases,
                        claims=held,
                        lease_seconds=self.settings.lease_seconds,
                    ),
                    "extend leases",
                    give_up_after=self.settings.heartbeat_seconds,
                )
            except psycopg.Error:
                continue
            lost = [
                c
                for c in held
                if c.document.id not in extended
                and self._in_flight.get(c.document.id) is c
            ]
            if lost:
                self._forget_lost(lost)

    def _forget_lost(self, lost: list[Claim]) -> None:
        self.tally.lost += len(lost)
        unstarted = [c for c in lost if c.document.id not in self._started]
        for claim in unstarted:
            del self._in_flight[claim.document.id]
        if unstarted:
            self._signal_changed()
        log.warning(
            "%d documents lost their lease (cancelled, or expired and taken over): "
            "%d unstarted dropped, the outcomes of the others will be refused",
            len(lost),
            len(unstarted),
        )

    async def call_db(
        self,
        operation: Callable[[psycopg.AsyncConnection[Any]], Any],
        what: str,
        *,
        give_up_after: float | None = None,
    ) -> Any:
        """Run operation on a pool connection, retrying while the server is unreachable.

        Gives up (re-raising) after give_up_after seconds, by default the lease
        time: past it our leases have expired and the work is someone else's.
        A try without an answer for two lease times (10 s at least) fails: a
        half-open connection (a peer gone behind a NAT, a stalled proxy) raises
        nothing by itself, and cancelling the try makes psycopg close it, so the
        next try gets a new connection from the pool. A try that is only slow
        (a lock wait, a huge result) must not be cut short: its documents stay
        locked, and so ours, while it runs.
        """
        deadline = time.monotonic() + (give_up_after or self.settings.lease_seconds)
        patience = max(2 * self.settings.lease_seconds, 10.0)
        delay = 0.05
        warned = False
        while True:
            try:
                try:
                    with anyio.fail_after(patience):
                        async with self.pool.connection() as conn:
                            result = await operation(conn)
                except TimeoutError as exc:
                    raise psycopg.OperationalError(
                        f"no answer from the database within {patience:g} s"
                    ) from exc
                if warned:
                    log.info("database reachable again; %s succeeded", what)
                return result
            except psycopg.OperationalError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                if not warned:
                    log.warning(
                        "cannot %s, retrying: %s",
                        what,
                        str(exc).strip().splitlines()[0]
                        if str(exc).strip()
                        else type(exc).__name__,
                    )
                    warned = True
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def stop(self, grace: float) -> None:
        """Stop extracting new documents, let started ones finish within grace seconds,
        and hand every other claimed document back to uploaded."""
        self._stopping = True
        self._signal_changed()
        with anyio.move_on_after(grace):
            while self._started & self._in_flight.keys():
                await self._wait_changed()
        unstarted = [
            c for c in self._in_flight.values() if c.document.id not in self._started
        ]
        started = [
            c for c in self._in_flight.values() if c.document.id in self._started
        ]
        await self._release(unstarted, unstarted=True)
        await self._release(started, unstarted=False)

    async def _release(self, claims: list[Claim], *, unstarted: bool) -> None:
        if not claims:
            return
        try:
            released = await self.call_db(
                lambda conn: claims_db.release_documents(
                    conn,
                    claims,
                    unstarted=unstarted,
                    max_attempts=self.settings.max_attempts,
                ),
                "hand back documents",
                give_up_after=5.0,
            )
        except psycopg.Error as exc:
            log.warning(
                "could not hand back %d documents (%s); their leases will expire",
                len(claims),
                exc,
            )
            return
        self.tally.released += released
        for claim in claims:
            self._in_flight.pop(claim.document.id, None)
        log.info("handed back %d documents", released)


@asynccontextmanager
async def running_engine(
    pool: AsyncConnectionPool,
    extractor: Extractor,
    settings: ProcessingSettings,
    worker: str,
    **options: Any,
) -> AsyncIterator[Engine]:
    """Yield a serving Engine; on exit stop its tasks (call drain() or stop() first)."""
    engine = Engine(pool, extractor, settings, worker, **options)
    async with anyio.create_task_group() as task_group:
        await engine.serve(task_group)
        try:
            yield engine
        finally:
            task_group.cancel_scope.cancel()
    engine.close()
