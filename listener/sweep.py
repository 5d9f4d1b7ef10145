"""Recovery of missed and abandoned work: the cron-style `listener sweep` pass."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg

from listener import claim as claims_db
from listener.config import ProcessingSettings
from listener.db import open_pool
from listener.extractors import Extractor
from listener.worker import Engine, running_engine

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Recovery:
    """What one recovery pass put right."""

    requeued: int
    failed: int
    repaired: int


@dataclass(frozen=True, slots=True)
class SweepSummary:
    """What one `listener sweep` run did."""

    recovery: Recovery
    batches: int
    completed: int
    failed: int
    retried: int
    stale: int

    def describe(self) -> str:
        """Return the one-line summary printed at the end of a sweep."""
        return (
            f"sweep: {self.batches} batches touched, {self.completed} documents "
            f"completed, {self.failed} failed, {self.retried} retrying, "
            f"{self.recovery.requeued} recovered from dead workers "
            f"({self.recovery.failed} of them out of attempts), "
            f"{self.recovery.repaired} batches repaired"
        )


async def recover(conn: psycopg.AsyncConnection[Any], max_attempts: int) -> Recovery:
    """Requeue or fail documents of dead workers, then close batches left open."""
    cursor = await conn.execute(
        "SELECT requeued, failed FROM recover_expired_leases(%s)", (max_attempts,)
    )
    row = await cursor.fetchone()
    requeued, failed = (row[0], row[1]) if row else (0, 0)
    cursor = await conn.execute("SELECT repair_batches()")
    repaired_row = await cursor.fetchone()
    repaired = int(repaired_row[0]) if repaired_row else 0
    if requeued or failed or repaired:
        log.info(
            "recovered %d documents of dead workers (%d out of attempts), "
            "repaired %d batches",
            requeued + failed,
            failed,
            repaired,
        )
    return Recovery(requeued, failed, repaired)


async def sweep_candidates(
    conn: psycopg.AsyncConnection[Any], max_batches: int
) -> list[UUID]:
    """Return the ids of batches with work waiting, oldest created_at first."""
    cursor = await conn.execute(
        "SELECT batch_id FROM sweep_candidates(%s)", (max_batches,)
    )
    return [row[0] for row in await cursor.fetchall()]


async def sweep_once(
    dsn: str,
    extractor: Extractor,
    settings: ProcessingSettings,
    worker: str,
    *,
    max_batches: int,
    max_docs_per_batch: int,
) -> SweepSummary:
    """Recover, then process up to max_docs_per_batch documents of up to
    max_batches batches, oldest first; return what was done."""
    pool = await open_pool(dsn, size=3)
    try:
        async with pool.connection() as conn:
            recovery = await recover(conn, settings.max_attempts)
            batch_ids = await sweep_candidates(conn, max_batches)

        async with running_engine(pool, extractor, settings, worker) as engine:
            for batch_id in batch_ids:
                await _serve_batch(engine, batch_id, max_docs_per_batch)
            await engine.drain()
            tally = engine.tally
    finally:
        await pool.close()

    return SweepSummary(
        recovery=recovery,
        batches=len(batch_ids),
        completed=tally.completed,
        failed=tally.failed,
        retried=tally.retried,
        stale=tally.stale,
    )


async def _serve_batch(engine: Engine, batch_id: UUID, max_docs: int) -> None:
    remaining = max_docs
    while remaining > 0:
        await engine.wait_for_capacity()
        size = min(remaining, engine.settings.claim_size, engine.free_capacity)
        claims = await engine.call_db(
            functools.partial(
                claims_db.claim_batch,
                worker=engine.worker,
                max_docs=size,
                lease_seconds=engine.settings.lease_seconds,
                batch_id=batch_id,
                max_content_bytes=engine.settings.max_content_bytes,
            ),
            "claim documents",
        )
        if not claims:
            return
        engine.submit(claims)
        remaining -= len(claims)
