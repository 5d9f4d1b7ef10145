"""`listener run`: in-process Services and real processes against real PostgreSQL."""

from __future__ import annotations

import functools
import signal
import statistics
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from helpers import (
    batch_row,
    extractor_env,
    make_batch,
    usage_of,
)
from processes import ListenerProcess
from psycopg import sql

from listener import Document, PermanentError
from listener.config import ProcessingSettings
from listener.extractors import Extractor, noop
from listener.service import Service

Conn = psycopg.Connection[Any]
TERMINAL = ("completed", "partially_completed", "failed", "cancelled")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def status_of(conn: Conn, batch_id: uuid.UUID) -> str:
    return str(batch_row(conn, batch_id)["status"])


def document_states(conn: Conn, batch_id: uuid.UUID) -> Counter[str]:
    rows = conn.execute(
        "SELECT status FROM documents WHERE batch_id = %s", (batch_id,)
    ).fetchall()
    return Counter(status for (status,) in rows)


def total_usage(conn: Conn) -> int:
    row = conn.execute(
        "SELECT coalesce(sum(documents_processed), 0) FROM user_usage"
    ).fetchone()
    assert row is not None
    return int(row[0])


def insert_silently(conn: Conn, n_docs: int, user_id: str = "u1") -> uuid.UUID:
    """Insert a batch with its documents and no notification: triggers suppressed."""
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        return make_batch(conn, user_id=user_id, n_docs=n_docs)


async def until(condition: Callable[[], bool], timeout: float = 20) -> None:
    """Poll condition (a quick query) until it holds, failing after timeout s."""
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.02)


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    """Poll condition from sync code until it holds; fail after timeout s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.02)


# In-process Services.


@asynccontextmanager
async def running_service(
    dsn: str,
    extractor: Extractor,
    *,
    sweep_interval: float = 3600,
    shutdown_grace: float = 5,
    **settings: Any,
) -> AsyncIterator[Service]:
    """Run a Service until the block ends, then stop it gracefully."""
    service = Service(
        dsn,
        extractor,
        ProcessingSettings(**settings),
        sweep_interval=sweep_interval,
        shutdown_grace=shutdown_grace,
    )
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(service.run)
        with anyio.fail_after(15):
            await service.ready.wait()
        try:
            yield service
        finally:
            service.request_stop()


@pytest.mark.anyio
async def test_inserts_are_processed_without_any_sweep(dsn: str, conn: Conn) -> None:
    """Measure insert-commit to extractor-call latency over 50 one-document batches."""
    called: dict[uuid.UUID, float] = {}

    async def timed(document: Document) -> dict[str, Any]:
        called[document.batch_id] = time.perf_counter()
        return {}

    latencies = []
    async with running_service(dsn, timed) as service:
        sweeps = service.sweeps
        for _ in range(50):
            batch_id = make_batch(conn, n_docs=1)
            committed = time.perf_counter()
            await until(functools.partial(called.__contains__, batch_id), timeout=5)
            latencies.append(called[batch_id] - committed)
        await until(
            lambda: all(status_of(conn, b) == "completed" for b in called), timeout=10
        )

        assert service.sweeps == sweeps == 1
    assert usage_of(conn, "u1") == 50
    latencies.sort()
    print(
        f"\ninsert-to-extraction latency over {len(latencies)} inserts: median "
        f"{statistics.median(latencies) * 1000:.2f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99) - 1] * 1000:.2f} ms, "
        f"max {latencies[-1] * 1000:.2f} ms"
    )


@pytest.mark.anyio
async def test_a_burst_of_notifications_costs_a_few_claims_not_a_storm(
    dsn: str, conn: Conn
) -> None:
    async with running_service(dsn, noop) as service:
        first = make_batch(conn, n_docs=1)
        await until(lambda: status_of(conn, first) == "completed")
        before = service.claims

        # Distinct payloads, so PostgreSQL does not fold them.
        conn.execute(
            "SELECT pg_notify('batch_work', gen_random_uuid()::text)"
            " FROM generate_series(1, 3000)"
        )
        last = make_batch(conn, n_docs=1)
        await until(lambda: status_of(conn, last) == "completed")

        claims = service.claims - before
    assert claims < 20, f"{claims} claims for one burst and one batch"


@pytest.mark.anyio
async def test_garbage_payloads_do_not_stop_the_service(dsn: str, conn: Conn) -> None:
    garbage = [f"garbage {i} ');DROP TABLE documents;--" for i in range(3000)]
    garbage += ["", "x" * 7999, "{}", "null", str(uuid.uuid4()).upper() + "-"]
    async with running_service(dsn, noop):
        with conn.transaction():
            for channel in ("batch_work", "batch_finished", "batch_sweep"):
                conn.execute(
                    "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p",
                    (channel, garbage),
                )
        # A well-formed id of no batch: a hint that leads nowhere.
        conn.execute("SELECT pg_notify('batch_work', %s)", (str(uuid.uuid4()),))
        batch_id = make_batch(conn, n_docs=3)

        await until(lambda: status_of(conn, batch_id) == "completed")

    assert usage_of(conn, "u1") == 3


@pytest.mark.anyio
async def test_uploading_batch_is_left_alone_until_it_is_queued(
    dsn: str, conn: Conn
) -> None:
    seen: list[uuid.UUID] = []

    def recording(document: Document) -> dict[str, Any]:
        seen.append(document.batch_id)
        return {}

    async with running_service(dsn, recording) as service:
        uploading = make_batch(conn, n_docs=3, status="uploading")
        other = make_batch(conn, n_docs=2)
        await until(lambda: status_of(conn, other) == "completed")
        conn.execute("SELECT request_sweep()")
        await until(lambda: service.sweeps == 2)
        # Processed after the sweep's claims: they had their chance at it.
        after = make_batch(conn, n_docs=1)
        await until(lambda: status_of(conn, after) == "completed")

        assert uploading not in seen
        assert status_of(conn, uploading) == "uploading"
        assert document_states(conn, uploading) == {"uploaded": 3}

        conn.execute(
            "UPDATE extraction_batches SET status = 'queued' WHERE id = %s",
            (uploading,),
        )
        await until(lambda: status_of(conn, uploading) == "completed")

    assert seen.count(uploading) == 3


@pytest.mark.anyio
async def test_retried_document_is_picked_up_when_due_without_a_sweep(
    dsn: str, conn: Conn
) -> None:
    attempts: list[int] = []

    def flaky(document: Document) -> dict[str, Any]:
        attempts.append(document.attempt)
        if document.attempt == 1:
            raise RuntimeError("flaky first try")
        return {}

    async with running_service(dsn, flaky, retry_delay=0.3) as service:
        batch_id = make_batch(conn, n_docs=2)

        await until(lambda: status_of(conn, batch_id) == "completed", timeout=10)

        assert service.sweeps == 1
    assert sorted(attempts) == [1, 1, 2, 2]


@pytest.mark.anyio
async def test_quota_deferred_documents_are_claimed_when_the_quota_frees(
    dsn: str, conn: Conn
) -> None:
    """Documents held back only by in-flight ones need no notification or sweep."""
    conn.execute("INSERT INTO user_usage (user_id, documents_limit) VALUES ('q', 3)")
    release = anyio.Event()
    first_batch: list[uuid.UUID] = []
    calls: list[uuid.UUID] = []

    async def gated(document: Document) -> dict[str, Any]:
        calls.append(document.batch_id)
        if document.batch_id in first_batch:
            await release.wait()
            raise PermanentError("first batch fails, giving its quota back")
        return {}

    async with running_service(dsn, gated, concurrency=4) as service:
        first_batch.append(make_batch(conn, user_id="q", n_docs=3))
        await until(lambda: len(calls) == 3)
        claims = service.claims
        second = make_batch(conn, user_id="q", n_docs=2)
        # The claim the second batch's notification caused found nothing it may take.
        await until(lambda: service.claims > claims)
        assert document_states(conn, second) == {"uploaded": 2}

        release.set()
        await until(lambda: status_of(conn, second) == "completed", timeout=10)

        assert service.sweeps == 1
    assert status_of(conn, first_batch[0]) == "failed"
    assert usage_of(conn, "q") == 2


@pytest.mark.anyio
async def test_documents_over_max_content_bytes_fail_unread(
    dsn: str, conn: Conn
) -> None:
    seen: list[str] = []

    def recording(document: Document) -> dict[str, Any]:
        seen.append(document.file_name)
        return {}

    async with running_service(dsn, recording, max_content_bytes=8):
        small = make_batch(conn, n_docs=1, content=b"tiny")
        big = make_batch(conn, n_docs=2, content=b"eleven bytes")

        await until(lambda: status_of(conn, small) == "completed")
        await until(lambda: status_of(conn, big) == "failed")

    assert seen == ["doc-0.txt"]
    errors = conn.execute(
        "SELECT DISTINCT error FROM documents WHERE batch_id = %s", (big,)
    ).fetchall()
    assert errors == [("content is 12 bytes, over the limit of 8 bytes",)]


@pytest.mark.anyio
async def test_a_huge_batch_does_not_hold_back_a_small_one_queued_after_it(
    dsn: str, conn: Conn
) -> None:
    async def a_millisecond(document: Document) -> dict[str, Any]:
        await anyio.sleep(0.001)
        return {}

    async with running_service(dsn, a_millisecond, concurrency=4):
        huge = make_batch(conn, user_id="big", n_docs=4000)
        await until(lambda: batch_row(conn, huge)["completed_count"] >= 50)
        small = make_batch(conn, user_id="small", n_docs=1)

        await until(lambda: status_of(conn, small) == "completed")

        huge_now = batch_row(conn, huge)
    assert huge_now["status"] == "processing"
    assert huge_now["completed_count"] < 4000
    print(
        f"\nthe 1-document batch finished while the 4,000-document batch had "
        f"{4000 - huge_now['completed_count']} documents to go"
    )


@pytest.mark.anyio
async def test_requeue_batch_retries_failed_documents_end_to_end(
    dsn: str, conn: Conn
) -> None:
    broken = {"doc-0.txt"}
    attempts: list[tuple[str, int]] = []

    def picky(document: Document) -> dict[str, Any]:
        attempts.append((document.file_name, document.attempt))
        if document.file_name in broken:
            raise PermanentError("unreadable today")
        return {}

    async with running_service(dsn, picky):
        batch_id = make_batch(conn, n_docs=3)
        await until(lambda: status_of(conn, batch_id) == "partially_completed")
        broken.clear()

        row = conn.execute("SELECT requeue_batch(%s)", (batch_id,)).fetchone()
        await until(lambda: status_of(conn, batch_id) == "completed")

    assert row == (1,)
    batch = batch_row(conn, batch_id)
    assert (batch["completed_count"], batch["failed_count"], batch["error"]) == (
        3,
        0,
        None,
    )
    assert attempts.count(("doc-0.txt", 1)) == 2
    assert usage_of(conn, "u1") == 3


@pytest.mark.anyio
async def test_cancel_batch_stops_its_work_and_charges_nothing(
    dsn: str, conn: Conn
) -> None:
    release = anyio.Event()
    calls: list[uuid.UUID] = []

    async def gated(document: Document) -> dict[str, Any]:
        calls.append(document.id)
        await release.wait()
        return {}

    async with running_service(dsn, gated, concurrency=2) as service:
        batch_id = make_batch(conn, n_docs=6)
        await until(lambda: len(calls) == 2 and service.engine.in_flight == 4)

        row = conn.execute("SELECT cancel_batch(%s)", (batch_id,)).fetchone()
        await until(lambda: service.engine.in_flight == 2)
        release.set()
        await until(lambda: service.engine.in_flight == 0)

        tally = service.engine.tally
        assert (tally.completed, tally.stale) == (0, 2)
    assert row == (6,)
    assert len(calls) == 2
    batch = batch_row(conn, batch_id)
    assert (batch["status"], batch["failed_count"]) == ("cancelled", 6)
    assert document_states(conn, batch_id) == {"failed": 6}
    assert usage_of(conn, "u1") == 0


def test_control_functions_name_an_unknown_batch(conn: Conn) -> None:
    missing = uuid.uuid4()

    for function in ("requeue_batch", "cancel_batch"):
        call = sql.SQL("SELECT {}(%s)").format(sql.Identifier(function))
        with pytest.raises(psycopg.errors.NoDataFound, match=f"batch {missing}"):
            conn.execute(call, (missing,))


def test_control_functions_refuse_a_batch_in_the_wrong_state(conn: Conn) -> None:
    uploading = make_batch(conn, n_docs=1, status="uploading")
    queued = make_batch(conn, n_docs=1)
    cancelled = make_batch(conn, n_docs=1)
    conn.execute("SELECT cancel_batch(%s)", (cancelled,))
    prerequisite = psycopg.errors.ObjectNotInPrerequisiteState

    with pytest.raises(prerequisite, match="still uploading"):
        conn.execute("SELECT requeue_batch(%s)", (uploading,))
    with pytest.raises(prerequisite, match="no failed documents"):
        conn.execute("SELECT requeue_batch(%s)", (queued,))
    with pytest.raises(prerequisite, match=f"batch {cancelled} is already cancelled"):
        conn.execute("SELECT cancel_batch(%s)", (cancelled,))


@pytest.mark.anyio
async def test_a_slow_extraction_keeps_its_lease_against_another_worker(
    dsn: str, conn: Conn
) -> None:
    """Heartbeats outlast the lease; a sweeping neighbour does not steal it."""
    calls: list[tuple[str, int]] = []

    async def slow(document: Document) -> dict[str, Any]:
        calls.append(("slow", document.attempt))
        await anyio.sleep(4)
        return {}

    def fast(document: Document) -> dict[str, Any]:
        calls.append(("fast", document.attempt))
        return {}

    async with running_service(dsn, slow, lease_seconds=1.5):
        batch_id = make_batch(conn, n_docs=1)
        await until(lambda: bool(calls))
        async with running_service(dsn, fast, sweep_interval=0.2, lease_seconds=1.5):
            await until(lambda: status_of(conn, batch_id) == "completed", timeout=15)

    assert calls == [("slow", 1)]
    assert usage_of(conn, "u1") == 1


# Real `listener run` processes.


@pytest.fixture
def spawn(dsn: str, tmp_path: Path) -> Iterator[Callable[..., ListenerProcess]]:
    """Yield a factory of listener processes; kill whatever is left at the end."""
    started: list[ListenerProcess] = []

    def start(*options: str, extractor: str = "record", **env: str) -> ListenerProcess:
        record = tmp_path / f"calls-{len(started)}.txt"
        child = ListenerProcess(
            dsn,
            *options,
            extractor=f"extractors_for_tests:{extractor}",
            env=extractor_env(record) | env,
            record=record,
        )
        started.append(child)
        return child

    yield start
    for child in started:
        child.kill()


def backends_killed(conn: Conn) -> int:
    row = conn.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        " AND backend_type = 'client backend'"
    ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.slow
def test_start_up_sweep_and_request_sweep_find_unannounced_work(
    conn: Conn, spawn: Callable[..., ListenerProcess]
) -> None:
    announced = make_batch(conn, n_docs=2)
    silent = insert_silently(conn, n_docs=3)
    listener = spawn("--sweep-interval", "3600")
    listener.wait_ready()

    wait_until(
        lambda: status_of(conn, announced) == status_of(conn, silent) == "completed"
    )
    # Let the claim that follows every group commit run before the silent
    # insert, or it could find the new documents on its own (under load).
    time.sleep(1.0)

    later = insert_silently(conn, n_docs=2)
    # Not the assertion: shows that nothing but the request will find it.
    time.sleep(1.0)
    assert document_states(conn, later) == {"uploaded": 2}
    conn.execute("SELECT request_sweep()")
    wait_until(lambda: status_of(conn, later) == "completed")
    listener.signal_group(signal.SIGTERM)
    assert listener.exit_code() == 0
    assert sorted(Counter(doc for doc, _ in listener.calls()).values()) == [1] * 7


@pytest.mark.slow
def test_listener_recovers_from_killed_connections_with_a_document_in_flight(
    conn: Conn, spawn: Callable[..., ListenerProcess]
) -> None:
    listener = spawn(
        "--sweep-interval", "3600", extractor="slow_record", LISTENER_TEST_SLEEP="1.5"
    )
    listener.wait_ready()
    in_flight = make_batch(conn, n_docs=1)
    wait_until(lambda: len(listener.calls()) == 1)

    killed_at = time.monotonic()
    assert backends_killed(conn) >= 2
    during_outage = make_batch(conn, n_docs=1)
    listener.wait_for_line("LISTEN connection restored")
    restored = time.monotonic() - killed_at
    wait_until(lambda: len(listener.calls()) == 2)
    caught_up = time.monotonic() - killed_at
    wait_until(lambda: status_of(conn, during_outage) == "completed")
    wait_until(lambda: status_of(conn, in_flight) == "completed")
    after = make_batch(conn, n_docs=2)
    wait_until(lambda: status_of(conn, after) == "completed")

    listener.signal_group(signal.SIGTERM)
    assert listener.exit_code() == 0
    assert [attempt for _, attempt in listener.calls()] == [1, 1, 1, 1]
    assert usage_of(conn, "u1") == 4
    print(
        f"\nkilled connections: LISTEN restored after {restored * 1000:.0f} ms, "
        f"work committed during the outage extracted after {caught_up * 1000:.0f} ms"
    )


@pytest.mark.slow
def test_a_killed_listeners_documents_are_finished_by_another(
    conn: Conn, spawn: Callable[..., ListenerProcess]
) -> None:
    lease = 2.0
    doomed = spawn(
        "--concurrency", "4", "--lease-seconds", str(lease),
        extractor="sleep_async", LISTENER_TEST_SLEEP="60",
    )  # fmt: skip
    doomed.wait_ready()
    batch_id = make_batch(conn, n_docs=6)
    wait_until(lambda: len(doomed.calls()) == 4)
    assert document_states(conn, batch_id) == {"processing": 6}

    doomed.signal_group(signal.SIGKILL)
    killed_at = time.monotonic()
    rescuer = spawn("--sweep-interval", "0.5", "--lease-seconds", str(lease))
    rescuer.wait_ready()
    wait_until(lambda: status_of(conn, batch_id) == "completed", timeout=lease + 20)
    took = time.monotonic() - killed_at

    assert len({doc for doc, _ in rescuer.calls()}) == len(rescuer.calls()) == 6
    assert {attempt for _, attempt in rescuer.calls()} == {2}
    assert usage_of(conn, "u1") == 6
    print(f"\nSIGKILLed listener's 6 documents done by another {took:.2f} s later")


@pytest.mark.slow
def test_three_listeners_share_two_thousand_documents_each_extracted_once(
    conn: Conn, spawn: Callable[..., ListenerProcess]
) -> None:
    listeners = [
        spawn(
            "--concurrency", "4", extractor="slow_record", LISTENER_TEST_SLEEP="0.005"
        )
        for _ in range(3)
    ]
    for listener in listeners:
        listener.wait_ready()

    batches = [make_batch(conn, user_id=f"user{i % 4}", n_docs=100) for i in range(20)]
    wait_until(
        lambda: all(status_of(conn, b) == "completed" for b in batches), timeout=90
    )

    for listener in listeners:
        listener.signal_group(signal.SIGTERM)
    assert [listener.exit_code() for listener in listeners] == [0, 0, 0]
    calls = [listener.calls() for listener in listeners]
    extracted = Counter(doc for per_process in calls for doc, _ in per_process)
    rows = conn.execute(
        "SELECT id::text FROM documents WHERE batch_id = ANY(%s)", (batches,)
    ).fetchall()
    assert set(extracted) == {doc for (doc,) in rows}
    assert set(extracted.values()) == {1}
    assert total_usage(conn) == 2000
    assert all(per_process for per_process in calls), [len(c) for c in calls]
    print(f"\nthree listeners extracted {[len(c) for c in calls]} documents")


@pytest.mark.slow
def test_sigterm_hands_back_slow_documents_and_exits_0(
    conn: Conn, spawn: Callable[..., ListenerProcess]
) -> None:
    listener = spawn(
        "--concurrency", "2", "--shutdown-grace", "1",
        extractor="sleep_sync", LISTENER_TEST_SLEEP="30",
    )  # fmt: skip
    listener.wait_ready()
    batch_id = make_batch(conn, n_docs=5)
    wait_until(lambda: len(listener.calls()) == 2)

    listener.signal_group(signal.SIGTERM)
    code = listener.exit_code(timeout=15)

    assert code == 0, listener.log()
    assert document_states(conn, batch_id) == {"uploaded": 5}
    attempts = conn.execute(
        "SELECT attempts, lease_token FROM documents WHERE batch_id = %s",
        (batch_id,),
    ).fetchall()
    # Two tries started and count; the prefetched two were never tried.
    assert sorted(a for a, _ in attempts) == [0, 0, 0, 1, 1]
    assert all(token is None for _, token in attempts)


@pytest.mark.slow
def test_sigint_to_the_group_lets_documents_in_flight_finish(
    conn: Conn, spawn: Callable[..., ListenerProcess]
) -> None:
    listener = spawn(
        "--concurrency", "2", "--shutdown-grace", "20",
        extractor="sleep_async", LISTENER_TEST_SLEEP="1",
    )  # fmt: skip
    listener.wait_ready()
    batch_id = make_batch(conn, n_docs=4)
    wait_until(lambda: len(listener.calls()) == 2)

    listener.signal_group(signal.SIGINT)
    code = listener.exit_code(timeout=15)

    assert code == 0, listener.log()
    assert document_states(conn, batch_id) == {"completed": 2, "uploaded": 2}
    assert usage_of(conn, "u1") == 2


@pytest.mark.slow
def test_a_second_signal_exits_at_once(
    conn: Conn, spawn: Callable[..., ListenerProcess]
) -> None:
    listener = spawn(
        "--shutdown-grace", "60", extractor="sleep_async", LISTENER_TEST_SLEEP="60"
    )
    listener.wait_ready()
    make_batch(conn, n_docs=1)
    wait_until(lambda: len(listener.calls()) == 1)

    listener.signal_group(signal.SIGTERM)
    listener.wait_for_line("shutting down")
    listener.signal_group(signal.SIGTERM)
    code = listener.exit_code(timeout=10)

    assert code == 128 + signal.SIGTERM
    assert "exiting at once" in listener.log()
