"""Benchmark 1: documents/s and CPU per document of one `listener run`."""

from __future__ import annotations

import time
from typing import Any

import orjson
import psycopg

from bench.common import BackendClock, Figure, Server, process_cpu_seconds, say
from bench.process import listener_running

BATCHES = 20
DOCS = 1000
EXTRACTOR = "listener.extractors:noop"
TIMEOUT = 300.0

# Batches are loaded as uploading, so that nothing is claimed before the clock
# starts; one UPDATE then queues them all, and its commit starts the clock.
_LOAD = """
WITH batch AS (
    INSERT INTO extraction_batches (user_id, status)
    SELECT 'bench-user-' || b, 'uploading' FROM generate_series(1, %(batches)s) AS b
    RETURNING id, user_id
)
INSERT INTO documents (batch_id, user_id, file_name, content)
SELECT batch.id, batch.user_id, format('doc-%%s.txt', i), %(content)s::bytea
FROM batch, generate_series(1, %(docs)s) AS i
"""
_QUEUE = (
    "UPDATE extraction_batches SET status = 'queued' WHERE status = 'uploading'"
    " RETURNING id"
)


def load(conn: psycopg.Connection[Any], batches: int, docs: int) -> None:
    """Insert `batches` uploading batches of `docs` documents each."""
    conn.execute(
        _LOAD, {"batches": batches, "docs": docs, "content": b"hello world " * 8}
    )
    conn.execute("VACUUM ANALYZE extraction_batches, documents")


def queue_and_wait(
    conn: psycopg.Connection[Any], watch: psycopg.Connection[Any], timeout: float
) -> float:
    """Queue every uploading batch and return seconds until the last is terminal.

    `watch` must already LISTEN on batch_finished.
    """
    began = time.monotonic()
    ids = {row[0] for row in conn.execute(_QUEUE).fetchall()}
    pending = {str(i) for i in ids}
    deadline = began + timeout
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{len(pending)} batches not finished after {timeout} s")
        for note in watch.notifies(timeout=min(left, 1.0)):
            pending.discard(orjson.loads(note.payload).get("batch_id"))
            if not pending:
                break
    return time.monotonic() - began


def check_all_completed(conn: psycopg.Connection[Any], docs: int) -> None:
    """Raise unless every batch completed with all its documents charged once."""
    row = conn.execute(
        "SELECT count(*) FILTER (WHERE status <> 'completed' OR completed_count <> %s),"
        " (SELECT count(*) FROM documents WHERE status <> 'completed'),"
        " (SELECT coalesce(sum(documents_processed), 0) FROM user_usage),"
        " (SELECT count(*) FROM documents)"
        " FROM extraction_batches",
        (docs,),
    ).fetchone()
    assert row is not None
    bad_batches, bad_docs, charged, total = row
    if bad_batches or bad_docs or charged != total:
        raise RuntimeError(
            f"run was wrong: {bad_batches} batches and {bad_docs} documents not "
            f"completed, {charged} charges for {total} documents"
        )


def run(server: Server, runs: int) -> list[Figure]:
    """Process BATCHES x DOCS no-op documents with one listener, `runs` times."""
    rate = Figure("throughput", "docs/s")
    listener_cpu = Figure("listener CPU per document", "us", digits=1)
    backend_cpu = Figure(
        "PostgreSQL CPU per document (backends of the bench database)", "us", digits=1
    )
    for number in range(runs):
        dsn = server.create_database("throughput")
        dbname = str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])
        try:
            with (
                psycopg.connect(dsn, autocommit=True) as conn,
                psycopg.connect(dsn, autocommit=True) as watch,
            ):
                load(conn, BATCHES, DOCS)
                watch.execute("LISTEN batch_finished")
                with listener_running(dsn, EXTRACTOR) as listener:
                    clock = BackendClock(conn, dbname)
                    clock.start()
                    cpu_before = process_cpu_seconds(listener.pid)
                    spent = queue_and_wait(conn, watch, TIMEOUT)
                    cpu = process_cpu_seconds(listener.pid) - cpu_before
                    db_cpu = clock.elapsed()
                check_all_completed(conn, DOCS)
        finally:
            server.drop_database(dsn)
        total = BATCHES * DOCS
        rate.add(total / spent)
        listener_cpu.add(cpu / total * 1e6)
        if clock.available:
            backend_cpu.add(db_cpu / total * 1e6)
        say(
            f"  run {number + 1}: {total / spent:,.0f} docs/s in {spent:.2f} s; "
            f"CPU per document: listener {cpu / total * 1e6:.1f} us, "
            f"PostgreSQL {db_cpu / total * 1e6:.1f} us"
        )
    return [rate, listener_cpu, backend_cpu]
