"""How many documents a listener holds: its prefetch follows its extractors' pace."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.lowlevel
import psycopg
import pytest
from helpers import make_batch, usage_of

from listener import Document
from listener.claim import Claim
from listener.config import ProcessingSettings
from listener.extractors import Extractor, noop
from listener.service import Service
from listener.worker import PREFETCH_CAP, YIELD_SECONDS, Engine

Conn = psycopg.Connection[Any]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def running_service(
    dsn: str, extractor: Extractor, **settings: Any
) -> AsyncIterator[Service]:
    service = Service(
        dsn,
        extractor,
        ProcessingSettings(**settings),
        sweep_interval=3600,
        shutdown_grace=5,
    )
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(service.run)
        with anyio.fail_after(15):
            await service.ready.wait()
        try:
            yield service
        finally:
            service.request_stop()


def processing(conn: Conn, batch_id: uuid.UUID) -> int:
    row = conn.execute(
        "SELECT count(*) FROM documents WHERE batch_id = %s AND status = 'processing'",
        (batch_id,),
    ).fetchone()
    assert row is not None
    return int(row[0])


def finished(conn: Conn, batch_id: uuid.UUID) -> bool:
    row = conn.execute(
        "SELECT status FROM extraction_batches WHERE id = %s", (batch_id,)
    ).fetchone()
    assert row is not None
    return row[0] == "completed"


@pytest.mark.anyio
async def test_a_cheap_extractor_is_given_more_than_twice_its_concurrency(
    dsn: str, conn: Conn
) -> None:
    held: list[int] = []
    limits: list[int] = []

    async with running_service(dsn, noop, concurrency=2, claim_size=500) as service:
        batch_id = make_batch(conn, n_docs=6000)
        with anyio.fail_after(60):
            while not finished(conn, batch_id):
                held.append(processing(conn, batch_id))
                limits.append(service.engine.limit)
                await anyio.sleep(0.005)

    assert max(held) > 2 * 2
    assert 2 * 2 < max(limits) <= 2 + PREFETCH_CAP
    assert usage_of(conn, "u1") == 6000


@pytest.mark.anyio
async def test_an_extractor_that_has_finished_nothing_holds_twice_its_concurrency(
    dsn: str, conn: Conn
) -> None:
    release = anyio.Event()
    started: list[uuid.UUID] = []

    async def gated(document: Document) -> dict[str, Any]:
        started.append(document.id)
        await release.wait()
        return {}

    async with running_service(dsn, gated, concurrency=3, claim_size=500) as service:
        batch_id = make_batch(conn, n_docs=100)
        with anyio.fail_after(15):
            while len(started) < 3 or processing(conn, batch_id) < 6:
                await anyio.sleep(0.01)
            claims = service.claims
            # Until something is recorded the pace is unknown: no more claims.
            while service.engine.in_flight < 6:
                await anyio.sleep(0.01)

        assert service.engine.limit == 6
        assert processing(conn, batch_id) == 6
        assert service.claims == claims

        release.set()
        with anyio.fail_after(30):
            while not finished(conn, batch_id):
                await anyio.sleep(0.02)

    assert usage_of(conn, "u1") == 100


@pytest.mark.anyio
async def test_a_worker_taking_queued_claims_lets_other_tasks_run_between_them() -> (
    None
):
    """Claims taken without waiting still yield once YIELD_SECONDS have passed."""
    engine = Engine(None, noop, ProcessingSettings(concurrency=1), "w")  # type: ignore[arg-type]
    engine.submit([_claim() for _ in range(5)])
    taken: list[Claim] = []
    seen_by_other_task: list[int] = []

    async def worker() -> None:
        for _ in range(5):
            claim = await engine._next_claim()
            assert claim is not None
            taken.append(claim)
            # A document that blocks the event loop, longer than YIELD_SECONDS.
            time.sleep(YIELD_SECONDS * 2)

    async def other_task() -> None:
        while len(taken) < 5:
            seen_by_other_task.append(len(taken))
            await anyio.lowlevel.checkpoint()

    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(worker)
            tasks.start_soon(other_task)
    finally:
        engine.close()

    assert len(taken) == 5
    assert {1, 2, 3, 4} <= set(seen_by_other_task)


def _claim() -> Claim:
    document = Document(
        id=uuid.uuid4(),
        batch_id=uuid.uuid4(),
        user_id="u1",
        file_name="a.txt",
        content=b"",
        storage_url=None,
        attempt=1,
    )
    return Claim(document, uuid.uuid4(), datetime.now(UTC))
