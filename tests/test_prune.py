"""Table growth: listener_prune_chunk(), CALL listener_prune() and `listener prune`."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import psycopg.errors
import pytest
from helpers import batch_row, claim, finish, make_batch, run_cli, usage_of

from listener.errors import ConfigError
from listener.prune import parse_duration

Conn = psycopg.Connection[Any]


def _finished(
    conn: Conn, n_docs: int = 2, days_ago: float = 40, **kw: Any
) -> uuid.UUID:
    """Insert a batch, complete its documents, and date its completion."""
    batch_id = make_batch(conn, n_docs=n_docs, **kw)
    if n_docs:
        finish(conn, claim(conn, batch_id=batch_id))
    else:
        claim(conn, batch_id=batch_id)  # closes it as failed: no documents
    conn.execute(
        "UPDATE extraction_batches SET completed_at = now() - make_interval(days => %s)"
        " WHERE id = %s",
        (days_ago, batch_id),
    )
    return batch_id


def _exists(conn: Conn, batch_id: uuid.UUID) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM extraction_batches WHERE id = %s", (batch_id,)
    ).fetchone()
    return row == (1,)


def _chunk(conn: Conn, *args: object) -> tuple[int, int]:
    placeholders = ", ".join(["%s"] * len(args))
    row = conn.execute(
        f"SELECT batches, documents FROM listener_prune_chunk({placeholders})",  # noqa: S608
        args,
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", timedelta(days=30)),
        ("12h", timedelta(hours=12)),
        ("90m", timedelta(minutes=90)),
        ("45s", timedelta(seconds=45)),
        ("2w", timedelta(weeks=2)),
        ("1d12h", timedelta(days=1, hours=12)),
        ("1.5h", timedelta(minutes=90)),
        (" 7D ", timedelta(days=7)),
    ],
)
def test_durations_parse(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "30", "d", "30x", "-1d", "1d 2h", "thirty days"])
def test_bad_durations_are_refused_by_name(text: str) -> None:
    with pytest.raises(ConfigError, match="must look like 30d"):
        parse_duration(text)


def test_prune_deletes_only_finished_batches_older_than_the_cutoff(
    conn: Conn, dsn: str
) -> None:
    old = _finished(conn, n_docs=3, user_id="u1")
    old_empty = _finished(conn, n_docs=0, user_id="u1")
    recent = _finished(conn, n_docs=2, user_id="u1", days_ago=1)
    open_old = make_batch(
        conn, user_id="u1", n_docs=2, created_at=datetime.now(UTC) - timedelta(days=90)
    )

    result = run_cli("prune", "--older-than", "30d", dsn=dsn)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("prune: deleted 2 batches and 3 documents finished")
    assert not _exists(conn, old)
    assert not _exists(conn, old_empty)
    assert _exists(conn, recent)
    assert _exists(conn, open_old)
    documents = conn.execute(
        "SELECT count(*) FROM documents WHERE batch_id = %s", (old,)
    ).fetchone()
    assert documents == (0,)
    # Usage is history the customer was billed for: it stays, accounted for.
    assert usage_of(conn, "u1") == 5
    assert conn.execute("SELECT * FROM listener_check()").fetchall() == []


def test_chunks_are_bounded_by_batches_and_by_documents(conn: Conn) -> None:
    for _ in range(5):
        _finished(conn, n_docs=3)
    cutoff = conn.execute("SELECT now() - interval '30 days'").fetchone()
    assert cutoff is not None

    by_batches = _chunk(conn, cutoff[0], 2)
    by_documents = _chunk(conn, cutoff[0], 100, 5)
    big_one = _chunk(conn, cutoff[0], 100, 1)
    rest = _chunk(conn, cutoff[0])

    assert by_batches == (2, 6)
    # 3 documents before the second batch are under 5; 6 before a third are not.
    assert by_documents == (2, 6)
    # One batch at least, whatever its size.
    assert big_one == (1, 3)
    assert rest == (0, 0)


def test_procedure_prunes_chunk_by_chunk_and_reports_totals(conn: Conn) -> None:
    for _ in range(7):
        _finished(conn, n_docs=2)
    kept = _finished(conn, n_docs=1, days_ago=0)

    row = conn.execute("CALL listener_prune('30 days', 3)").fetchone()

    assert row == (7, 14)
    assert _exists(conn, kept)
    assert conn.execute("SELECT * FROM listener_check()").fetchall() == []


def test_procedure_inside_a_transaction_block_is_refused(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        _finished(conn)
        with pytest.raises(psycopg.errors.InvalidTransactionTermination):
            conn.execute("CALL listener_prune('30 days')")


def test_locked_batches_are_skipped_not_waited_for(conn: Conn, dsn: str) -> None:
    held_batch = _finished(conn, n_docs=2)
    held_document = _finished(conn, n_docs=2)
    free = _finished(conn, n_docs=2)

    with psycopg.connect(dsn) as other:
        # An operator's requeue locks documents before their batch.
        other.execute(
            "SELECT 1 FROM extraction_batches WHERE id = %s FOR NO KEY UPDATE",
            (held_batch,),
        )
        other.execute(
            "SELECT 1 FROM documents WHERE batch_id = %s LIMIT 1 FOR NO KEY UPDATE",
            (held_document,),
        )
        conn.execute("SET lock_timeout = '5s'")

        row = conn.execute("CALL listener_prune('30 days')").fetchone()

        other.rollback()

    assert row == (1, 2)
    assert _exists(conn, held_batch)
    assert _exists(conn, held_document)
    assert not _exists(conn, free)


def test_a_chunk_in_progress_does_not_block_the_listener(conn: Conn, dsn: str) -> None:
    _finished(conn, n_docs=3)
    working = make_batch(conn, n_docs=4)
    claimed = claim(conn, batch_id=working, max_docs=2)

    with psycopg.connect(dsn) as pruner:
        # A chunk deleted but not committed yet: its locks are held.
        assert _chunk(pruner, pruner.execute("SELECT now()").fetchone()[0]) == (1, 3)

        with psycopg.connect(dsn, autocommit=True) as listener:
            listener.execute("SET lock_timeout = '5s'")
            more = claim(listener, batch_id=working)
            done = finish(listener, claimed + more)
            recovered = listener.execute(
                "SELECT * FROM recover_expired_leases(3)"
            ).fetchone()

        pruner.commit()

    assert [d["outcome"] for d in done] == ["completed"] * 4
    assert recovered == (0, 0)
    assert batch_row(conn, working)["status"] == "completed"


@pytest.mark.parametrize(
    "args",
    [
        ("now() + interval '1 day'",),
        ("NULL",),
        ("now()", "0"),
        ("now()", "1000", "0"),
    ],
)
def test_chunk_refuses_bad_arguments(conn: Conn, args: tuple[str, ...]) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        conn.execute(f"SELECT * FROM listener_prune_chunk({', '.join(args)})")  # noqa: S608


def test_procedure_refuses_a_negative_age(conn: Conn) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="age >= 0"):
        conn.execute("CALL listener_prune('-1 day')")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--older-than", "soon"], "duration 'soon' must look like 30d"),
        ([], "--older-than"),
        (["--older-than", "1d", "--chunk-batches", "0"], "--chunk-batches"),
    ],
)
def test_cli_refuses_bad_options(dsn: str, args: list[str], message: str) -> None:
    result = run_cli("prune", *args, dsn=dsn)

    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_pruning_nothing_says_so(dsn: str) -> None:
    result = run_cli("prune", "--older-than", "1h", dsn=dsn)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("prune: deleted 0 batches and 0 documents")


def test_prune_reads_the_finished_index(conn: Conn) -> None:
    """Cost follows what is old enough to go, not the whole table."""
    conn.execute("SET enable_seqscan = off")
    plan = conn.execute(
        "EXPLAIN SELECT id FROM extraction_batches"
        " WHERE completed_at < now() - interval '30 days'"
        " AND status IN ('completed', 'partially_completed', 'failed', 'cancelled')"
        " ORDER BY completed_at LIMIT 1000"
    ).fetchall()

    assert "extraction_batches_finished_idx" in "\n".join(r[0] for r in plan)
