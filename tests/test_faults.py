"""The fault-injection suite: real listener processes under kills, cut
connections, a dropping and stalling proxy, a crashed PostgreSQL and
misbehaving extractors. Every run ends with listener_check() clean and usage
equal, user by user, to the documents completed.

Run it alone with `pytest -m fault`; it also runs with the rest. Each test
prints one FAULT line with its figures (`pytest -s` shows them).
"""

from __future__ import annotations

import random
import statistics
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from faults import (
    LeaseWatch,
    PrivateServer,
    TcpProxy,
    all_finished,
    assert_exact,
    fleet,
    insert_batches,
    verdict,
    wait_until,
)
from helpers import batch_row, make_batch, usage_of

from listener import Document
from listener import claim as claims_db
from listener.config import ProcessingSettings
from listener.db import open_pool
from listener.migrate import apply_migrations
from listener.worker import running_engine

pytestmark = [pytest.mark.fault, pytest.mark.slow]

Conn = psycopg.Connection[Any]
# Kills and cuts may hit one document many times; none of them is its fault.
PATIENT = "20"


def _calls(tmp_path: Path) -> list[tuple[str, int, int]]:
    """Return the extractor calls recorded: (document id, attempt, pid)."""
    record = tmp_path / "calls.txt"
    if not record.exists():
        return []
    return [
        (doc, int(attempt), int(pid))
        for doc, attempt, pid in (
            line.split() for line in record.read_text().split("\n") if line
        )
    ]


def _assert_one_lease_per_try(tmp_path: Path) -> None:
    """No two extractions of a document ran under the same attempt (one claim)."""
    tries = Counter((doc, attempt) for doc, attempt, _ in _calls(tmp_path))
    assert [key for key, n in tries.items() if n > 1] == []


def _held_by(conn: Conn, pid: int) -> list[uuid.UUID]:
    rows = conn.execute(
        "SELECT id FROM documents WHERE status = 'processing' AND lease_owner LIKE %s",
        (f"%:{pid}:%",),
    ).fetchall()
    return [r[0] for r in rows]


def _db_now(conn: Conn) -> Any:
    row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return row[0]


def _recovery_seconds(conn: Conn, since: Any, documents: list[uuid.UUID]) -> float:
    """Return how long after `since` the last of these documents finished."""
    row = conn.execute(
        "SELECT extract(epoch FROM max(processed_at) - %s) FROM documents"
        " WHERE id = ANY(%s)",
        (since, documents),
    ).fetchone()
    assert row is not None and row[0] is not None
    return float(row[0])


def _spread(values: list[float]) -> str:
    if not values:
        return "none"
    return f"median {statistics.median(values):.2f} s, max {max(values):.2f} s"


@pytest.fixture
def base_options() -> list[str]:
    return [
        "--lease-seconds", "2",
        "--sweep-interval", "1",
        "--max-attempts", PATIENT,
        "--retry-delay", "0.1",
        "--shutdown-grace", "2",
    ]  # fmt: skip


# --- SIGKILL and restart ---------------------------------------------------------


@pytest.mark.timeout(240)
def test_three_listeners_one_killed_and_restarted_every_two_seconds(
    conn: Conn, dsn: str, tmp_path: Path, base_options: list[str]
) -> None:
    batches = insert_batches(conn, 50, 100)
    rng = random.Random(6)
    kills: list[tuple[Any, list[uuid.UUID], LeaseWatch]] = []

    with fleet(
        dsn, tmp_path, *base_options, "--concurrency", "4",
        extractor="fault_extractors:steady", LISTENER_FAULT_SLEEP="0.03",
    ) as listeners:  # fmt: skip
        for _ in range(3):
            listeners.start()
        deadline = time.monotonic() + 150
        while not all_finished(conn, batches):
            assert time.monotonic() < deadline, listeners.logs()
            time.sleep(2)
            victim = rng.choice(listeners.children)
            listeners.kill(victim)
            held = LeaseWatch.held_by(conn, victim.pid)
            kills.append(
                (_db_now(conn), [doc for doc, _ in held], LeaseWatch(dsn, held))
            )
            listeners.start()
        codes = listeners.stop_all()

    result = verdict(conn, int(PATIENT))
    broken = [watch.result() for _, held, watch in kills if held]
    done = [_recovery_seconds(conn, at, held) for at, held, _ in kills if held]
    print(
        result.line(
            "sigkill",
            f"{len(kills)} SIGKILLs every 2 s, each restarted, "
            f"{sum(len(h) for _, h, _ in kills)} documents held by the killed",
            f"their leases (2 s) broken {_spread(broken)} after the kill, the "
            f"documents done {_spread(done)} after it (behind the backlog)",
        )
    )
    assert codes == [0, 0, 0]
    assert len(kills) >= 3
    assert result.documents == result.completed == 5000
    assert_exact(conn, result)
    _assert_one_lease_per_try(tmp_path)
    assert result.recovered > 0


# --- connections cut with pg_terminate_backend -------------------------------------


def _cut_listener_connections(admin: Conn) -> int:
    row = admin.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        " AND application_name IN ('listener', 'listener-listen')"
    ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.timeout(240)
def test_connections_cut_at_random_moments(
    conn: Conn, dsn: str, tmp_path: Path, base_options: list[str]
) -> None:
    rng = random.Random(7)
    batches: list[uuid.UUID] = []
    cuts: list[int] = []
    pickups: list[float] = []

    with fleet(
        dsn, tmp_path, *base_options, "--concurrency", "4",
        extractor="fault_extractors:steady", LISTENER_FAULT_SLEEP="0.01",
    ) as listeners, psycopg.connect(dsn, autocommit=True) as admin:  # fmt: skip
        for _ in range(2):
            listeners.start()
        # 30 waves of 100 documents, a cut after each at a random moment.
        for _ in range(30):
            batches += insert_batches(conn, 1, 100)
            time.sleep(rng.uniform(0.05, 0.6))
            cuts.append(_cut_listener_connections(admin))
            # Work committed just after a cut: how soon is it picked up?
            (probe,) = insert_batches(conn, 1, 1, users=1)
            batches.append(probe)
            pickups.append(
                wait_until(
                    lambda probe=probe: all_finished(conn, [probe]),  # type: ignore[misc]
                    30,
                    "probe after a cut",
                )
            )
        wait_until(lambda: all_finished(conn, batches), 120, "all batches")
        codes = listeners.stop_all()

    result = verdict(conn, int(PATIENT))
    print(
        result.line(
            "terminate",
            f"{len(cuts)} rounds of pg_terminate_backend, {sum(cuts)} connections cut",
            f"a document committed right after a cut done {_spread(pickups)} later",
        )
    )
    assert codes == [0, 0]
    assert sum(cuts) >= 2 * len(cuts)
    assert result.documents == result.completed == 3030
    assert_exact(conn, result)
    _assert_one_lease_per_try(tmp_path)


# --- a TCP proxy that drops and stalls -------------------------------------------


@pytest.fixture
def proxy(dsn: str) -> Iterator[TcpProxy]:
    made = TcpProxy.to(dsn)
    try:
        yield made
    finally:
        made.close()


@pytest.mark.timeout(240)
def test_a_proxy_that_drops_and_stalls_the_connections(
    conn: Conn, dsn: str, tmp_path: Path, base_options: list[str], proxy: TcpProxy
) -> None:
    events: list[str] = []
    pickups: list[float] = []

    def wait_for_probe(what: str) -> None:
        (probe,) = insert_batches(conn, 1, 1, users=1)
        batches.append(probe)
        try:
            pickups.append(wait_until(lambda: all_finished(conn, [probe]), 60, what))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{listeners.logs()}") from None

    with fleet(
        proxy.dsn(dsn), tmp_path, *base_options, "--concurrency", "4",
        extractor="fault_extractors:steady", LISTENER_FAULT_SLEEP="0.01",
    ) as listeners:  # fmt: skip
        for _ in range(2):
            listeners.start()
        batches = insert_batches(conn, 10, 100)
        time.sleep(0.5)

        events.append(f"dropped {proxy.drop()} connections")
        wait_for_probe("probe after a drop")

        batches += insert_batches(conn, 10, 100)
        time.sleep(0.5)
        events.append(f"stalled {proxy.stall()} connections for 3 s")
        time.sleep(3)
        proxy.heal()
        wait_for_probe("probe after a stall")
        # Work no notification announces: only a working sweep finds it.
        with conn.transaction():
            conn.execute("SET LOCAL session_replication_role = replica")
            (silent,) = insert_batches(conn, 1, 1, users=1)
        batches.append(silent)
        try:
            pickups.append(
                wait_until(lambda: all_finished(conn, [silent]), 60, "silent batch")
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{listeners.logs()}") from None

        wait_until(lambda: all_finished(conn, batches), 120, "all batches")
        codes = listeners.stop_all()

    result = verdict(conn, int(PATIENT))
    print(
        result.line(
            "proxy",
            ", ".join(events) + f" ({proxy.accepted} connections accepted in all)",
            f"a document committed after each fault done {_spread(pickups)} later",
        )
    )
    assert codes == [0, 0]
    assert result.documents == result.completed == 2003
    assert_exact(conn, result)
    _assert_one_lease_per_try(tmp_path)


# --- PostgreSQL crashed and restarted ----------------------------------------------


@pytest.fixture
def private_server() -> Iterator[PrivateServer]:
    server = PrivateServer()
    try:
        yield server
    finally:
        server.close()


@pytest.mark.timeout(240)
def test_postgresql_crashes_and_restarts_mid_run(
    tmp_path: Path, base_options: list[str], private_server: PrivateServer
) -> None:
    dsn = private_server.database("faults")
    apply_migrations(dsn)
    conn = psycopg.connect(dsn, autocommit=True)
    try:
        with fleet(
            dsn, tmp_path, *base_options, "--concurrency", "4",
            extractor="fault_extractors:steady", LISTENER_FAULT_SLEEP="0.02",
        ) as listeners:  # fmt: skip
            for _ in range(2):
                listeners.start()
            batches = insert_batches(conn, 20, 100)
            wait_until(lambda: len(_calls(tmp_path)) > 500, 60, "a third done")

            conn.close()
            private_server.crash()
            # The outage: the server refuses connections meanwhile.
            time.sleep(2)
            private_server.start()
            back = time.monotonic()
            conn = psycopg.connect(dsn, autocommit=True)
            in_flight = conn.execute(
                "SELECT count(*) FROM documents WHERE status = 'processing'"
            ).fetchone()
            (probe,) = insert_batches(conn, 1, 1, users=1)
            wait_until(lambda: all_finished(conn, [probe]), 60, "probe after restart")
            pickup = time.monotonic() - back
            wait_until(lambda: all_finished(conn, [*batches, probe]), 120, "all")
            done = time.monotonic() - back
            codes = listeners.stop_all()

        result = verdict(conn, int(PATIENT))
        print(
            result.line(
                "restart",
                "PostgreSQL stopped with -m immediate (a crash), down 2 s, restarted;"
                f" {in_flight[0] if in_flight else '?'} documents left processing",
                f"work committed after the restart done {pickup:.2f} s after it, "
                f"everything {done:.2f} s after it",
            )
        )
        assert codes == [0, 0]
        assert result.documents == result.completed == 2001
        assert_exact(conn, result)
        _assert_one_lease_per_try(tmp_path)
    finally:
        conn.close()


# --- extractors that hang, raise, return garbage or too much --------------------------


def _chaos_name(index: int) -> str:
    kinds = {0: "hang", 1: "raise", 2: "flaky", 3: "nonjson"}
    return f"{kinds.get(index, 'doc')}-{index}.txt"


@pytest.mark.timeout(240)
def test_extractors_that_hang_raise_return_garbage_or_a_huge_result(
    conn: Conn, dsn: str, tmp_path: Path
) -> None:
    batches = insert_batches(conn, 20, 50, file_names=_chaos_name)
    (huge_batch,) = insert_batches(
        conn, 1, 3, users=1, file_names=lambda i: f"huge-{i}.bin"
    )
    batches.append(huge_batch)

    # A lease long enough for the 60 MB group commit (about 3 s on 2 cores):
    # with a shorter one its documents would be retried, correctly, but then
    # their attempts could not be told in advance.
    with fleet(
        dsn, tmp_path,
        "--lease-seconds", "10", "--sweep-interval", "1", "--max-attempts", "2",
        "--retry-delay", "0.1", "--extract-timeout", "1", "--concurrency", "4",
        "--shutdown-grace", "1",
        extractor="fault_extractors:chaos",
    ) as listeners:  # fmt: skip
        for _ in range(2):
            listeners.start()
        took = wait_until(lambda: all_finished(conn, batches), 150, "all batches")
        # Still serving after 40 threads hung for good.
        (after,) = insert_batches(conn, 1, 20, users=1)
        wait_until(lambda: all_finished(conn, [after]), 60, "a batch after the hangs")
        codes = listeners.stop_all()

    rows = conn.execute(
        "SELECT split_part(file_name, '-', 1), status, attempts, error,"
        " coalesce(octet_length(result::text), 0)"
        " FROM documents"
    ).fetchall()
    outcomes: dict[str, Counter[tuple[str, int]]] = defaultdict(Counter)
    errors: dict[str, set[str]] = defaultdict(set)
    for kind, status, attempts, error, size in rows:
        outcomes[kind][(status, attempts)] += 1
        if error:
            errors[kind].add(error.split(" on attempt")[0])
        if kind == "huge":
            assert size > 20_000_000
    result = verdict(conn, 2)
    print(
        result.line(
            "extractors",
            "20 hanging (sync, never return), 20 raising, 20 failing once, "
            "20 returning a set and an object, 3 returning 20 MB",
            f"all batches closed {took:.1f} s after the start; "
            f"outcomes {dict((k, dict(v)) for k, v in outcomes.items())}",
        )
    )
    assert codes == [0, 0]
    assert outcomes["doc"] == {("completed", 1): 20 * 46 + 20}
    assert outcomes["flaky"] == {("completed", 2): 20}
    # On a loaded machine a 20 MB result can outlast its lease before its
    # group commit starts; it is then retried, which is also correct.
    assert sum(outcomes["huge"].values()) == 3
    assert {status for status, _ in outcomes["huge"]} == {"completed"}
    assert outcomes["hang"] == {("failed", 2): 20}
    assert errors["hang"] == {"extraction timed out after 1 s"}
    assert outcomes["raise"] == {("failed", 2): 20}
    assert errors["raise"] == {"RuntimeError: extractor crashed"}
    assert outcomes["nonjson"] == {("failed", 1): 20}
    assert all("not JSON-serialisable" in e for e in errors["nonjson"])
    assert_exact(conn, result)
    _assert_one_lease_per_try(tmp_path)


# --- garbage notifications -----------------------------------------------------------


def _garbage(rng: random.Random, terminal: uuid.UUID) -> list[tuple[str, str]]:
    """Return (channel, payload) pairs no listener should act on, or act on safely."""
    unknown = str(uuid.uuid4())
    fixed = [
        ("batch_work", ""),
        ("batch_work", "x" * 7999),
        ("batch_work", unknown),
        ("batch_work", unknown.upper()),
        ("batch_work", f"{{{unknown}}}"),
        ("batch_work", str(terminal)),
        ("batch_work", "'; DROP TABLE documents; --"),
        ("batch_finished", "{"),
        ("batch_finished", '{"batch_id": 1, "status": []}'),
        ("batch_finished", f'{{"batch_id": "{unknown}", "status": "completed"}}'),
        ("batch_finished", f'{{"batch_id": "{terminal}", "total_documents": 1e999}}'),
        ("batch_sweep", "please"),
    ]
    alphabet = "".join(map(chr, range(1, 0x250))) + '\u2603\U0001f4a5{}[]":,'
    noise = [
        (
            rng.choice(["batch_work", "batch_finished", "batch_sweep"]),
            "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300))),
        )
        for _ in range(200)
    ]
    return fixed + noise


@pytest.mark.timeout(120)
def test_garbage_notifications_are_contained(
    conn: Conn, dsn: str, tmp_path: Path, base_options: list[str]
) -> None:
    rng = random.Random(8)
    (terminal,) = insert_batches(conn, 1, 1)
    conn.execute("SELECT cancel_batch(%s)", (terminal,))
    batches: list[uuid.UUID] = []

    with fleet(
        dsn, tmp_path, *base_options, "--sweep-interval", "3600",
        extractor="fault_extractors:steady",
    ) as listeners:  # fmt: skip
        listener = listeners.start()
        garbage = _garbage(rng, terminal)
        for index, (channel, payload) in enumerate(garbage):
            conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))
            if index % 20 == 0:
                batches += insert_batches(conn, 1, 5)
        # Only notifications can have announced these: no periodic sweep.
        wait_until(lambda: all_finished(conn, batches), 60, "batches among garbage")
        alive = listener.process.poll() is None
        codes = listeners.stop_all()

    result = verdict(conn, int(PATIENT))
    print(
        result.line(
            "payloads",
            f"{len(garbage)} malformed or misleading notifications on 3 channels",
            f"{len(batches)} real batches announced among them all done",
        )
    )
    assert alive
    assert codes == [0]
    assert result.completed == 5 * len(batches)
    assert_exact(conn, result)


# --- a group commit held up ---------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _waiting_on_a_lock(conn: Conn) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = 'listener' AND wait_event_type = 'Lock'"
    ).fetchone()
    return row is not None and row[0] > 0


def _lease_of(conn: Conn, document_id: uuid.UUID) -> Any:
    row = conn.execute(
        "SELECT lease_expires_at FROM documents WHERE id = %s", (document_id,)
    ).fetchone()
    assert row is not None
    return row[0]


@pytest.mark.anyio
async def test_a_group_commit_held_up_does_not_starve_the_heartbeat(
    conn: Conn, dsn: str
) -> None:
    """A slow finish_documents (a huge result, a lock) holds its documents' rows:
    the heartbeat must not wait on them, or every other lease runs out."""
    conn.execute("INSERT INTO user_usage (user_id) VALUES ('u1')")
    batch_id = make_batch(conn, user_id="u1", n_docs=2)
    release = anyio.Event()

    async def extractor(document: Document) -> dict[str, Any]:
        if document.file_name == "doc-1.txt":
            await release.wait()
        return {"ok": True}

    settings = ProcessingSettings(lease_seconds=2, concurrency=2)
    pool = await open_pool(dsn, size=3)
    blocker = psycopg.connect(dsn)
    try:
        # Charging doc-0 will wait for this transaction's lock on the usage row.
        blocker.execute("SELECT 1 FROM user_usage WHERE user_id = 'u1' FOR UPDATE")
        async with running_engine(pool, extractor, settings, "w-held") as engine:
            async with pool.connection() as claiming:
                claims = await claims_db.claim_batch(
                    claiming, "w-held", 2, settings.lease_seconds, batch_id
                )
            engine.submit(claims)
            (slow,) = [c for c in claims if c.document.file_name == "doc-1.txt"]
            with anyio.fail_after(10):
                while not _waiting_on_a_lock(conn):
                    await anyio.sleep(0.05)
                # Held up well past doc-1's first expiry, doc-1 is still ours.
                while _lease_of(conn, slow.document.id) < slow.lease_expires_at + (
                    timedelta(seconds=1.5)
                ):
                    await anyio.sleep(0.05)
            blocker.rollback()
            release.set()
            with anyio.fail_after(10):
                await engine.drain()
    finally:
        blocker.close()
        await pool.close()

    assert batch_row(conn, batch_id)["status"] == "completed"
    assert usage_of(conn, "u1") == 2
    assert conn.execute("SELECT * FROM listener_check()").fetchall() == []
