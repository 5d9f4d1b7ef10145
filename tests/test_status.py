"""`listener status` and the listener_status() function it reads."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
import uuid
from typing import Any

import orjson
import psycopg
import pytest
from helpers import make_batch, run_cli
from psycopg import sql

from listener.status import format_seconds, progress_bar


def _claim(
    conn: psycopg.Connection[Any], worker: str, n: int, batch_id: uuid.UUID
) -> None:
    conn.execute(
        "SELECT count(*) FROM claim_batch(%s, %s, %s, %s)", (worker, n, 60, batch_id)
    )


def _status(conn: psycopg.Connection[Any], **params: int) -> dict[str, Any]:
    row = conn.execute(
        "SELECT listener_status(%s, %s, %s)",
        (
            params.get("max_batches", 50),
            params.get("recent_failures", 10),
            params.get("error_chars", 200),
        ),
    ).fetchone()
    assert row is not None
    report: dict[str, Any] = row[0]
    return report


def _fail_documents(
    conn: psycopg.Connection[Any], batch_id: uuid.UUID, error: str, seconds_ago: int
) -> None:
    conn.execute(
        "UPDATE documents SET status = 'failed', error = %s,"
        " processed_at = now() - make_interval(secs => %s)"
        " WHERE batch_id = %s",
        (error, seconds_ago, batch_id),
    )


def test_status_json_reports_batches_queue_and_lease_owners(
    conn: psycopg.Connection[Any], dsn: str
) -> None:
    working = make_batch(conn, user_id="alice", n_docs=5)
    _claim(conn, "host-a:1:aaa", 2, working)
    _claim(conn, "host-b:2:bbb", 1, working)
    uploading = make_batch(conn, user_id="bob", n_docs=2, status="uploading")
    make_batch(conn, user_id="carol", n_docs=1)

    result = run_cli("status", "--json", dsn=dsn)

    assert result.returncode == 0, result.stderr
    report = orjson.loads(result.stdout)
    assert report["batch_counts"] == {"uploading": 1, "queued": 1, "processing": 1}
    by_id = {batch["id"]: batch for batch in report["batches"]}
    assert by_id[str(working)]["status"] == "processing"
    assert by_id[str(working)]["in_flight"] == 3
    assert by_id[str(working)]["total_documents"] == 5
    assert by_id[str(uploading)]["status"] == "uploading"
    assert report["queue"] == {
        "due": 3,
        "retry_wait": 0,
        "uploading": 2,
        "next_retry_at": None,
    }
    assert report["in_flight"]["documents"] == 3
    assert report["in_flight"]["expired"] == 0
    owners = {o["owner"]: o["documents"] for o in report["in_flight"]["owners"]}
    assert owners == {"host-a:1:aaa": 2, "host-b:2:bbb": 1}
    assert 0 <= report["notification_queue_usage"] <= 1


def test_status_json_keys_are_sorted_and_stable(
    conn: psycopg.Connection[Any], dsn: str
) -> None:
    make_batch(conn, n_docs=1)

    result = run_cli("status", "--json", dsn=dsn)

    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1
    report = orjson.loads(result.stdout)
    assert list(report) == [
        "batch_counts",
        "batches",
        "generated_at",
        "in_flight",
        "notification_queue_usage",
        "oldest_waiting",
        "queue",
        "recent_failures",
    ]
    assert list(report["batches"][0]) == sorted(report["batches"][0])


def test_documents_waiting_on_a_retry_are_not_due(
    conn: psycopg.Connection[Any],
) -> None:
    batch = make_batch(conn, n_docs=3)
    conn.execute(
        "UPDATE documents SET available_at = now() + interval '90 seconds'"
        " WHERE id = (SELECT min(id::text)::uuid FROM documents WHERE batch_id = %s)",
        (batch,),
    )

    report = _status(conn)

    assert report["queue"]["due"] == 2
    assert report["queue"]["retry_wait"] == 1
    assert report["queue"]["next_retry_at"] is not None


def test_oldest_waiting_is_the_due_document_waiting_longest(
    conn: psycopg.Connection[Any],
) -> None:
    make_batch(conn, n_docs=2)
    old = make_batch(conn, n_docs=1)
    conn.execute(
        "UPDATE documents SET available_at = now() - interval '1 hour'"
        " WHERE batch_id = %s",
        (old,),
    )

    oldest = _status(conn)["oldest_waiting"]

    assert oldest["batch_id"] == str(old)
    assert oldest["waiting_seconds"] >= 3600


def test_oldest_waiting_ignores_batches_still_uploading(
    conn: psycopg.Connection[Any],
) -> None:
    make_batch(conn, n_docs=2, status="uploading")

    assert _status(conn)["oldest_waiting"] is None


def test_recent_failures_are_the_latest_ones_newest_first_and_truncated(
    conn: psycopg.Connection[Any],
) -> None:
    batches = [make_batch(conn, n_docs=1) for _ in range(12)]
    for age, batch in enumerate(batches):
        _fail_documents(conn, batch, f"error number {age} " + "x" * 300, age)

    failures = _status(conn, recent_failures=10, error_chars=50)["recent_failures"]

    assert len(failures) == 10
    assert [f["batch_id"] for f in failures] == [str(b) for b in batches[:10]]
    assert failures[0]["error"].startswith("error number 0 ")
    assert all(len(f["error"]) == 50 and f["error"].endswith("…") for f in failures)


def test_expired_leases_are_counted(conn: psycopg.Connection[Any]) -> None:
    batch = make_batch(conn, n_docs=2)
    _claim(conn, "dead-worker", 2, batch)
    conn.execute(
        "UPDATE documents SET lease_expires_at = now() - interval '5 seconds'"
        " WHERE batch_id = %s",
        (batch,),
    )

    in_flight = _status(conn)["in_flight"]

    assert in_flight["expired"] == 2
    assert in_flight["owners"][0]["expires_in_seconds"] < 0


def test_batch_list_is_bounded_but_counts_are_not(
    conn: psycopg.Connection[Any],
) -> None:
    for _ in range(4):
        make_batch(conn, n_docs=1)

    report = _status(conn, max_batches=2)

    assert len(report["batches"]) == 2
    assert report["batch_counts"]["queued"] == 4


def test_status_queries_can_all_be_served_by_indexes(
    conn: psycopg.Connection[Any],
) -> None:
    """With sequential scans priced out, listener_status() needs none."""
    batch = make_batch(conn, n_docs=3)
    _claim(conn, "w", 1, batch)
    make_batch(conn, n_docs=1, status="uploading")

    with conn.transaction():
        conn.execute("SET LOCAL enable_seqscan = off")
        # Counts not yet flushed to the statistics; nothing flushes mid-transaction.
        before = _scans(conn)
        _status(conn)
        after = _scans(conn)

    seq_scans = {name: after[name][0] - before[name][0] for name in after}
    index_scans = {name: after[name][1] - before[name][1] for name in after}
    assert seq_scans == {"documents": 0, "extraction_batches": 0}
    assert all(n > 0 for n in index_scans.values())


def _scans(conn: psycopg.Connection[Any]) -> dict[str, tuple[int, int]]:
    rows = conn.execute(
        "SELECT relname, seq_scan, coalesce(idx_scan, 0)"
        " FROM pg_stat_xact_user_tables"
        " WHERE relname IN ('documents', 'extraction_batches')"
    ).fetchall()
    found = {name: (seq, idx) for name, seq, idx in rows}
    return {t: found.get(t, (0, 0)) for t in ("documents", "extraction_batches")}


def test_status_text_is_plain_when_piped(
    conn: psycopg.Connection[Any], dsn: str
) -> None:
    batch = make_batch(conn, user_id="alice", n_docs=4)
    conn.execute(
        "UPDATE documents SET status = 'failed', error = 'boom: bad bytes',"
        " processed_at = now() WHERE id IN"
        " (SELECT id FROM documents WHERE batch_id = %s LIMIT 1)",
        (batch,),
    )

    result = run_cli("status", dsn=dsn)

    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout
    assert str(batch)[:8] in result.stdout
    assert "[....................]" in result.stdout
    assert "queue: 3 documents due now, 0 waiting on retry" in result.stdout
    assert "boom: bad bytes" in result.stdout


def _read_until(fd: int, needle: bytes, count: int, deadline: float) -> bytes:
    seen = b""
    while seen.count(needle) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out waiting for {count}x {needle!r}: {seen!r}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    return seen


@pytest.mark.slow
def test_watch_redraws_in_place_on_a_terminal(
    conn: psycopg.Connection[Any], dsn: str
) -> None:
    make_batch(conn, n_docs=1)
    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "NO_COLOR")}
    child = subprocess.Popen(
        [sys.executable, "-m", "listener", "status", "--dsn", dsn, "--watch", "0.2"],
        stdin=follower,
        stdout=follower,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    os.close(follower)
    try:
        screen = _read_until(leader, b"\x1b[H", 2, time.monotonic() + 30)
    finally:
        child.terminate()
        child.wait(timeout=10)
        os.close(leader)

    assert b"\x1b[J" in screen
    assert b"batches in flight: 0 processing, 1 queued" in screen


@pytest.mark.slow
def test_watch_piped_prints_one_json_object_per_refresh(
    conn: psycopg.Connection[Any], dsn: str
) -> None:
    make_batch(conn, n_docs=1)
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    with subprocess.Popen(
        [sys.executable, "-m", "listener", "status", "--json", "--watch", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**env, "DATABASE_URL": dsn},
    ) as child:
        assert child.stdout is not None
        first = child.stdout.readline()
        make_batch(conn, n_docs=1)
        deadline = time.monotonic() + 30
        while True:
            later = orjson.loads(child.stdout.readline())
            if later["batch_counts"]["queued"] == 2 or time.monotonic() > deadline:
                break
        child.terminate()

    assert orjson.loads(first)["batch_counts"]["queued"] == 1
    assert later["batch_counts"]["queued"] == 2
    assert b"\x1b" not in first


def test_status_of_an_unmigrated_database_says_to_migrate(pg_admin_dsn: str) -> None:
    name = f"listener_empty_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        empty = psycopg.conninfo.make_conninfo(pg_admin_dsn, dbname=name)

        result = run_cli("status", dsn=empty)

        assert result.returncode == 1
        assert "listener migrate" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        with psycopg.connect(pg_admin_dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.mark.parametrize(
    ("done", "failed", "total", "bar"),
    [
        (0, 0, 10, "[....................]"),
        (5, 5, 10, "[##########xxxxxxxxxx]"),
        (10, 0, 10, "[####################]"),
        (1, 0, 3, "[#######.............]"),
        (0, 0, 0, "[                    ]"),
    ],
)
def test_progress_bar_shows_completed_failed_and_remaining(
    done: int, failed: int, total: int, bar: str
) -> None:
    assert progress_bar(done, failed, total) == bar


def test_colour_progress_bar_has_the_same_width() -> None:
    coloured = progress_bar(3, 2, 10, color=True)

    assert "\x1b[32m" in coloured
    stripped = coloured
    for code in ("\x1b[32m", "\x1b[31m", "\x1b[2m", "\x1b[0m"):
        stripped = stripped.replace(code, "")
    assert len(stripped) == 22


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.25, "250ms"), (4.21, "4.2s"), (185, "3m05s"), (7800, "2h10m")],
)
def test_durations_read_naturally(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text


@pytest.mark.slow
def test_watch_survives_a_lost_connection_and_keeps_stdout_json(
    conn: psycopg.Connection[Any], dsn: str
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    with subprocess.Popen(
        [sys.executable, "-m", "listener", "status", "--json", "--watch", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**env, "DATABASE_URL": dsn},
    ) as child:
        assert child.stdout is not None
        orjson.loads(child.stdout.readline())
        killed = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'listener'"
        ).fetchone()
        make_batch(conn, n_docs=1)
        deadline = time.monotonic() + 30
        while True:
            later = orjson.loads(child.stdout.readline())
            if later["batch_counts"]["queued"] == 1 or time.monotonic() > deadline:
                break
        child.terminate()

    assert killed == (1,)
    assert later["batch_counts"]["queued"] == 1
