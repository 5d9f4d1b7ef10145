"""Benchmark 3: claiming and sweeping with 1,000,000 finished documents vs none."""

from __future__ import annotations

import re
import statistics
import time
import uuid
from typing import Any

import psycopg
from psycopg import sql

from bench.common import Figure, Server, say
from listener.config import ProcessingSettings

# The open work drained in each run: batches x documents, all uploaded.
OPEN_BATCHES = 5
OPEN_DOCS = 1000
# What `listener run` claims per round trip by default.
CLAIM_SIZE = ProcessingSettings().claim_size
# Each run alternates the two databases SLOTS times (empty, full, full,
# empty, ...), so that the load of other work falls on both alike.
SLOTS = 4
SWEEPS_PER_SLOT = 10

# History: HISTORY_BATCHES batches of HISTORY_DOCS finished documents each.
HISTORY_BATCHES = 10_000
HISTORY_DOCS = 100

_OPEN_WORK = """
WITH batch AS (
    INSERT INTO extraction_batches (user_id)
    SELECT 'bench-user-' || b FROM generate_series(1, %(batches)s) AS b
    RETURNING id, user_id
)
INSERT INTO documents (batch_id, user_id, file_name, content)
SELECT batch.id, batch.user_id, format('doc-%%s.txt', i), %(content)s::bytea
FROM batch, generate_series(1, %(docs)s) AS i
"""

_CLAIM = "SELECT lease_token, document_id FROM claim_batch(%s, %s, %s)"
_FINISH = "SELECT count(*) FROM finish_documents(%s, %s, %s, %s::jsonb, %s)"
_SWEEP = (
    "SELECT recover_expired_leases(3)",
    "SELECT repair_batches()",
    "SELECT batch_id FROM sweep_candidates(10)",
)

# The history is written with its tables' own triggers disabled (count resets,
# counters, NOTIFY; some fire even as replica) and session_replication_role =
# replica (no foreign-key checks): the rows are made consistent by
# construction here, as the triggers and finish_documents would have left
# them. One batch in ten finished as partially_completed with 5 failed
# documents. Each trigger gets back exactly the mode it had.
_TRIGGERS = (
    "SELECT c.relname, t.tgname, t.tgenabled FROM pg_trigger t"
    " JOIN pg_class c ON c.oid = t.tgrelid"
    " WHERE NOT t.tgisinternal AND c.relname IN ('extraction_batches', 'documents')"
    " AND c.relnamespace = current_schema()::regnamespace"
)
_ENABLE = {"O": "ENABLE", "A": "ENABLE ALWAYS", "R": "ENABLE REPLICA", "D": "DISABLE"}
_HISTORY = [
    """
    CREATE TEMP TABLE bench_history ON COMMIT DROP AS
    SELECT i,
           gen_random_uuid() AS id,
           'history-user-' || (i %% 500) AS user_id,
           now() - interval '90 days' + i * interval '10 minutes' AS created_at,
           CASE WHEN i %% 10 = 0 THEN 5 ELSE 0 END AS failed
    FROM generate_series(1, %(batches)s) AS i
    """,
    """
    INSERT INTO extraction_batches (id, user_id, status, total_documents,
        completed_count, failed_count, created_at, updated_at, completed_at, error)
    SELECT h.id, h.user_id,
           CASE WHEN h.failed > 0 THEN 'partially_completed' ELSE 'completed' END,
           %(docs)s, %(docs)s - h.failed, h.failed,
           h.created_at, h.created_at + interval '3 minutes',
           h.created_at + interval '3 minutes',
           CASE WHEN h.failed > 0
               THEN format('%%s of %%s documents failed', h.failed, %(docs)s) END
    FROM bench_history h
    """,
    """
    INSERT INTO documents (batch_id, user_id, file_name, storage_url, status,
        attempts, result, error, created_at, updated_at, processed_at, available_at)
    SELECT h.id, h.user_id, format('scan-%%s.pdf', j),
           format('s3://bench-bucket/%%s/scan-%%s.pdf', h.id, j),
           CASE WHEN j <= h.failed THEN 'failed' ELSE 'completed' END,
           CASE WHEN j <= h.failed THEN 3 ELSE 1 END,
           CASE WHEN j <= h.failed THEN NULL
               ELSE jsonb_build_object('pages', j %% 7 + 1, 'words', j * 37 %% 900,
                                       'sha256', md5(h.id::text || j)) END,
           CASE WHEN j <= h.failed THEN 'ValueError: unreadable page' END,
           h.created_at, h.created_at + interval '2 minutes',
           h.created_at + interval '2 minutes', h.created_at
    FROM bench_history h, generate_series(1, %(docs)s) AS j
    """,
    """
    INSERT INTO user_usage AS u (user_id, documents_processed)
    SELECT h.user_id, sum(%(docs)s - h.failed) FROM bench_history h GROUP BY h.user_id
    ON CONFLICT (user_id) DO UPDATE
    SET documents_processed = u.documents_processed + excluded.documents_processed
    """,
]


def write_history(dsn: str, batches: int, docs: int) -> float:
    """Fill a database with finished batches; return the seconds it took."""
    began = time.perf_counter()
    with psycopg.connect(dsn) as conn:
        triggers = conn.execute(_TRIGGERS).fetchall()
        for table, name, _ in triggers:
            conn.execute(_alter_trigger(table, name, "D"))
        conn.execute("SET LOCAL session_replication_role = replica")
        for statement in _HISTORY:
            conn.execute(statement, {"batches": batches, "docs": docs})
        for table, name, mode in triggers:
            conn.execute(_alter_trigger(table, name, mode))
        conn.commit()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE extraction_batches, documents, user_usage")
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE status IN ('completed', 'failed')),"
            " pg_size_pretty(pg_total_relation_size('documents')) FROM documents"
        ).fetchone()
    assert row is not None
    say(f"  history: {row[0]:,} finished documents, documents table {row[1]}")
    return time.perf_counter() - began


def _alter_trigger(table: str, name: str, mode: str) -> sql.Composed:
    return sql.SQL("ALTER TABLE {} {} TRIGGER {}").format(
        sql.Identifier(table), sql.SQL(_ENABLE[mode]), sql.Identifier(name)
    )


def add_open_work(conn: psycopg.Connection[Any]) -> None:
    """Insert the open batches one run drains, and refresh statistics."""
    conn.execute(
        _OPEN_WORK,
        {"batches": OPEN_BATCHES, "docs": OPEN_DOCS, "content": b"hello world " * 20},
    )
    conn.execute("ANALYZE extraction_batches, documents")


def time_sweeps(conn: psycopg.Connection[Any], times: int) -> list[float]:
    """Return the seconds of each of `times` full sweep passes."""
    spent = []
    for _ in range(times):
        began = time.perf_counter()
        for statement in _SWEEP:
            conn.execute(statement, prepare=True).fetchall()
        spent.append(time.perf_counter() - began)
    return spent


def drain(conn: psycopg.Connection[Any], worker: str) -> tuple[int, float]:
    """Claim and complete everything waiting; return documents and seconds."""
    done = 0
    began = time.perf_counter()
    while True:
        rows = conn.execute(_CLAIM, (worker, CLAIM_SIZE, 60.0), prepare=True).fetchall()
        if not rows:
            break
        _finish_rows(conn, rows)
        n = len(rows)
        done += n
    return done, time.perf_counter() - began


def check_plans(dsn: str) -> list[str]:
    """Return the statements run by claiming and sweeping that seq-scan a big table.

    Runs the functions with auto_explain logging every nested statement's plan
    to this session, after enough calls that PL/pgSQL may have switched to
    generic plans.
    """
    plans: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        add_open_work(conn)
        worker = f"bench-plans-{uuid.uuid4().hex[:6]}"
        # Warm the plan caches past the five custom plans.
        for _ in range(8):
            rows = conn.execute(
                _CLAIM, (worker, CLAIM_SIZE, 60.0), prepare=True
            ).fetchall()
            _finish_rows(conn, rows)
            time_sweeps(conn, 1)
        conn.add_notice_handler(lambda diag: plans.append(diag.message_primary or ""))
        conn.execute("LOAD 'auto_explain'")
        conn.execute("SET auto_explain.log_min_duration = 0")
        conn.execute("SET auto_explain.log_nested_statements = on")
        conn.execute("SET auto_explain.log_analyze = on")
        conn.execute("SET auto_explain.log_timing = off")
        conn.execute("SET client_min_messages = log")
        for _ in range(2):
            rows = conn.execute(
                _CLAIM, (worker, CLAIM_SIZE, 60.0), prepare=True
            ).fetchall()
            _finish_rows(conn, rows)
            time_sweeps(conn, 1)
        conn.execute("SET client_min_messages = notice")
    bad = [
        p
        for p in plans
        if re.search(r"Seq Scan on (documents|extraction_batches)\b", p)
    ]
    return bad


def _finish_rows(conn: psycopg.Connection[Any], rows: list[Any]) -> None:
    if not rows:
        return
    n = len(rows)
    conn.execute(
        _FINISH,
        (
            [r[1] for r in rows],
            [r[0] for r in rows],
            ["completed"] * n,
            "[" + ",".join(["{}"] * n) + "]",
            [None] * n,
        ),
        prepare=True,
    ).fetchall()


def run(server: Server, runs: int) -> list[Figure]:
    """Measure claim throughput and sweep time, empty history vs 1,000,000 finished."""
    empty = server.create_database("scale_empty")
    full = server.create_database("scale_history")
    say(
        f"  writing {HISTORY_BATCHES * HISTORY_DOCS:,} finished documents "
        f"({HISTORY_BATCHES:,} batches)"
    )
    seconds = write_history(full, HISTORY_BATCHES, HISTORY_DOCS)
    say(f"  history written in {seconds:.1f} s")

    bad = check_plans(full)
    if bad:
        say("  PLAN WARNING: sequential scans of a big table inside the functions:")
        for plan in bad:
            say("    " + plan.replace("\n", "\n    "))
    else:
        say("  plans: no sequential scan of documents or extraction_batches")

    figures = {
        (kind, what): Figure(f"{what} ({label})", unit, digits=digits)
        for kind, label in (("empty", "empty history"), ("full", "1M finished"))
        for what, unit, digits in (
            ("claim throughput", "docs/s", 0),
            ("sweep pass", "ms", 2),
        )
    }
    ratios = {
        what: Figure(f"{what}: 1M finished / empty history (paired)", "x", digits=3)
        for what in ("claim throughput", "sweep pass")
    }
    worker = f"bench-scale-{uuid.uuid4().hex[:6]}"
    databases = {"empty": empty, "full": full}
    for number in range(runs):
        docs = dict.fromkeys(databases, 0)
        spent = dict.fromkeys(databases, 0.0)
        sweeps: dict[str, list[float]] = {kind: [] for kind in databases}
        for slot in range(SLOTS):
            order = ["empty", "full"] if slot % 2 == 0 else ["full", "empty"]
            for kind in order:
                with psycopg.connect(databases[kind], autocommit=True) as conn:
                    add_open_work(conn)
                    sweeps[kind] += time_sweeps(conn, SWEEPS_PER_SLOT)
                    done, seconds = drain(conn, worker)
                docs[kind] += done
                spent[kind] += seconds
        for kind in databases:
            figures[kind, "claim throughput"].add(docs[kind] / spent[kind])
            figures[kind, "sweep pass"].add(statistics.median(sweeps[kind]) * 1000)
        for what in ratios:
            ratios[what].add(
                figures["full", what].values[-1] / figures["empty", what].values[-1]
            )
        claims = [figures[k, "claim throughput"].values[-1] for k in databases]
        passes = [figures[k, "sweep pass"].values[-1] for k in databases]
        say(
            f"  run {number + 1}: claim {claims[0]:,.0f} vs {claims[1]:,.0f} docs/s,"
            f" sweep {passes[0]:.2f} vs {passes[1]:.2f} ms"
        )
    server.drop_database(empty)
    server.drop_database(full)
    return [*figures.values(), *ratios.values()]
