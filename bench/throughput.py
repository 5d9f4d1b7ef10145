"""Benchmark 1: documents/s and CPU per document of one `listener run`."""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import orjson
import psycopg
import psycopg.errors
from psycopg import sql

from bench.common import (
    BackendClock,
    Figure,
    Server,
    process_cpu_seconds,
    say,
    wait_until,
)
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


def track_functions(conn: psycopg.Connection[Any], dbname: str) -> bool:
    """Have the database's new sessions count calls of PL/pgSQL functions."""
    try:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET track_functions = 'pl'").format(
                sql.Identifier(dbname)
            )
        )
        # BENCH_AUTO_EXPLAIN_MS=40: log the plans of the listener's statements
        # (nested ones too) that take longer, to the server's log.
        slow_ms = os.environ.get("BENCH_AUTO_EXPLAIN_MS")
        if slow_ms:
            for setting in (
                sql.SQL("session_preload_libraries = 'auto_explain'"),
                sql.SQL("auto_explain.log_min_duration = {}").format(int(slow_ms)),
                sql.SQL("auto_explain.log_nested_statements = on"),
                sql.SQL("auto_explain.log_analyze = on"),
                sql.SQL("auto_explain.log_timing = off"),
            ):
                conn.execute(
                    sql.SQL("ALTER DATABASE {} SET {}").format(
                        sql.Identifier(dbname), setting
                    )
                )
    except psycopg.errors.InsufficientPrivilege:
        return False
    return True


def function_calls(conn: psycopg.Connection[Any]) -> str:
    """Describe the calls of the claiming and finishing functions, once counted."""
    rows = conn.execute(
        "SELECT funcname, calls, total_time FROM pg_stat_user_functions"
        " WHERE funcname IN ('claim_batch', 'finish_documents') ORDER BY funcname"
    ).fetchall()
    return ", ".join(
        f"{name} {calls} calls, {total / max(calls, 1):.2f} ms each"
        for name, calls, total in rows
    )


def _only_ours_left(conn: psycopg.Connection[Any], dbname: str) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (dbname,)
    ).fetchone()
    # This connection and the watching one.
    return row is not None and row[0] <= 2


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
                counted = track_functions(conn, dbname)
                watch.execute("LISTEN batch_finished")
                with listener_running(dsn, EXTRACTOR) as listener:
                    clock = BackendClock(conn, dbname)
                    clock.start()
                    cpu_before = process_cpu_seconds(listener.pid)
                    spent = queue_and_wait(conn, watch, TIMEOUT)
                    cpu = process_cpu_seconds(listener.pid) - cpu_before
                    db_cpu = clock.elapsed()
                check_all_completed(conn, DOCS)
                # Backends report their function counts as they exit.
                wait_until(
                    functools.partial(_only_ours_left, conn, dbname),
                    10,
                    "the listener's backends to exit",
                )
                calls = function_calls(conn) if counted else ""
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
        if calls:
            say(f"    {calls}")
    return [rate, listener_cpu, backend_cpu]
