"""The consistency checker: listener_check() and `listener check`."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from helpers import claim, finish, make_batch, run_cli, usage_of

Conn = psycopg.Connection[Any]


def violations(conn: Conn, *args: object) -> list[tuple[str, Any, Any, Any, str]]:
    """Return listener_check()'s rows, called with the given arguments."""
    placeholders = ", ".join(["%s"] * len(args))
    return conn.execute(
        f"SELECT * FROM listener_check({placeholders})",  # noqa: S608 - placeholders only
        args,
    ).fetchall()


def invariants(conn: Conn, *args: object) -> list[str]:
    """Return the names of the violated invariants, one per finding."""
    return [row[0] for row in violations(conn, *args)]


def test_processed_work_is_clean(conn: Conn) -> None:
    done = make_batch(conn, user_id="u1", n_docs=4)
    mixed = make_batch(conn, user_id="u2", n_docs=3)
    open_batch = make_batch(conn, user_id="u3", n_docs=5)
    make_batch(conn, user_id="u4", n_docs=2, status="uploading")
    finish(conn, claim(conn, batch_id=done))
    rows = claim(conn, batch_id=mixed)
    finish(conn, rows[:1])
    finish(conn, rows[1:], "failed", error="bad")
    rows = claim(conn, batch_id=open_batch, max_docs=3)
    finish(conn, rows[:1])
    finish(conn, rows[1:2], "error", error="flaky", retry_delay=60)

    assert violations(conn) == []
    assert usage_of(conn, "u1") == 4
    assert usage_of(conn, "u3") == 1


def test_counters_that_disagree_with_documents_are_reported(conn: Conn) -> None:
    batch_id = make_batch(conn, user_id="u1", n_docs=3)
    conn.execute(
        "UPDATE extraction_batches SET completed_count = 1, total_documents = 4"
        " WHERE id = %s",
        (batch_id,),
    )

    rows = violations(conn)

    assert [(r[0], r[1], r[3]) for r in rows] == [("batch_counts", batch_id, "u1")]
    assert "total 4, completed 1, failed 0" in rows[0][4]
    assert "documents: total 3, completed 0, failed 0" in rows[0][4]


def test_terminal_batch_with_unfinished_documents_is_reported(conn: Conn) -> None:
    batch_id = make_batch(conn, n_docs=2)
    conn.execute(
        "UPDATE extraction_batches SET status = 'completed', completed_at = now()"
        " WHERE id = %s",
        (batch_id,),
    )

    rows = violations(conn)

    assert [(r[0], r[1]) for r in rows] == [("terminal_batch_unfinished", batch_id)]
    assert "2 of its 2 documents are unfinished" in rows[0][4]


def test_open_batch_whose_documents_all_finished_is_reported(conn: Conn) -> None:
    batch_id = make_batch(conn, n_docs=2)
    conn.execute(
        "UPDATE documents SET status = 'failed', error = 'x', processed_at = now()"
        " WHERE batch_id = %s",
        (batch_id,),
    )
    conn.execute(
        "UPDATE extraction_batches SET failed_count = 2 WHERE id = %s", (batch_id,)
    )

    assert [(r[0], r[1]) for r in violations(conn)] == [
        ("open_batch_finished", batch_id)
    ]


def test_queued_batch_without_documents_is_not_a_violation(conn: Conn) -> None:
    make_batch(conn, n_docs=0)

    assert violations(conn) == []


def test_completed_at_that_disagrees_with_status_is_reported(conn: Conn) -> None:
    # The table's own CHECK constraint refuses both; the checker must still
    # see them in a database where that constraint was dropped or NOT VALID.
    conn.execute(
        "ALTER TABLE extraction_batches"
        " DROP CONSTRAINT extraction_batches_completed_at_check"
    )
    open_batch = make_batch(conn, n_docs=1)
    closed = make_batch(conn, n_docs=0)
    conn.execute(
        "UPDATE extraction_batches SET completed_at = now() WHERE id = %s",
        (open_batch,),
    )
    conn.execute(
        "UPDATE extraction_batches SET status = 'failed' WHERE id = %s", (closed,)
    )

    assert sorted((r[0], r[1]) for r in violations(conn)) == [
        ("completed_at_missing", closed),
        ("completed_at_while_open", open_batch),
    ]


def test_lease_expired_beyond_the_grace_is_reported(conn: Conn) -> None:
    batch_id = make_batch(conn, n_docs=2)
    rows = claim(conn, worker="dead-worker", batch_id=batch_id, max_docs=1)
    conn.execute(
        "UPDATE documents SET lease_expires_at = now() - interval '200 seconds'"
        " WHERE id = %s",
        (rows[0]["document_id"],),
    )

    found = violations(conn)

    assert [(r[0], r[2]) for r in found] == [("lease_expired", rows[0]["document_id"])]
    assert "worker dead-worker" in found[0][4]
    assert violations(conn, 3, 300) == []


def test_lease_within_the_grace_is_not_reported(conn: Conn) -> None:
    batch_id = make_batch(conn, n_docs=1)
    claim(conn, batch_id=batch_id, lease_seconds=0.001)

    assert violations(conn, 3, 60) == []


def test_attempts_above_the_maximum_are_reported(conn: Conn) -> None:
    batch_id = make_batch(conn, n_docs=1)
    conn.execute("UPDATE documents SET attempts = 5 WHERE batch_id = %s", (batch_id,))

    assert invariants(conn, 3) == ["attempts_exceeded"]
    assert violations(conn, 5) == []


def test_completed_document_never_charged_is_undercharged(conn: Conn) -> None:
    batch_id = make_batch(conn, user_id="u1", n_docs=2)
    finish(conn, claim(conn, batch_id=batch_id, max_docs=1))
    conn.execute(
        "UPDATE documents SET status = 'completed', processed_at = now()"
        " WHERE batch_id = %s AND status = 'uploaded'",
        (batch_id,),
    )
    conn.execute(
        "UPDATE extraction_batches SET completed_count = 2, status = 'completed',"
        " completed_at = now() WHERE id = %s",
        (batch_id,),
    )

    rows = violations(conn)

    assert [(r[0], r[3]) for r in rows] == [("usage_undercharged", "u1")]
    assert "charged 1 documents, expected 2" in rows[0][4]


def test_usage_raised_by_hand_is_overcharged_unless_excess_is_ignored(
    conn: Conn,
) -> None:
    batch_id = make_batch(conn, user_id="u1", n_docs=2)
    finish(conn, claim(conn, batch_id=batch_id))
    conn.execute("UPDATE user_usage SET documents_processed = 3 WHERE user_id = 'u1'")

    assert [(r[0], r[3]) for r in violations(conn)] == [("usage_overcharged", "u1")]
    assert violations(conn, 3, 120, False) == []


def test_usage_row_for_a_user_without_documents_is_overcharged(conn: Conn) -> None:
    conn.execute(
        "INSERT INTO user_usage (user_id, documents_processed) VALUES ('ghost', 2)"
    )

    assert invariants(conn) == ["usage_overcharged"]


def test_deleted_history_keeps_usage_accountable(conn: Conn) -> None:
    """Deleting completed documents (prune, an application) is not a violation."""
    pruned = make_batch(conn, user_id="u1", n_docs=3)
    kept = make_batch(conn, user_id="u1", n_docs=2)
    finish(conn, claim(conn, batch_id=pruned))
    finish(conn, claim(conn, batch_id=kept))

    conn.execute("DELETE FROM extraction_batches WHERE id = %s", (pruned,))
    conn.execute(
        "DELETE FROM documents WHERE id IN"
        " (SELECT id FROM documents WHERE batch_id = %s LIMIT 1)",
        (kept,),
    )

    assert usage_of(conn, "u1") == 5
    assert violations(conn) == []
    # What the ledger allows for is deleted documents, not a missing charge.
    conn.execute("UPDATE user_usage SET documents_processed = 6 WHERE user_id = 'u1'")
    assert invariants(conn) == ["usage_overcharged"]


def test_usage_reset_by_hand_stays_accountable(conn: Conn) -> None:
    batch_id = make_batch(conn, user_id="u1", n_docs=4)
    rows = claim(conn, batch_id=batch_id)
    finish(conn, rows[:2])

    conn.execute("UPDATE user_usage SET documents_processed = 0 WHERE user_id = 'u1'")
    finish(conn, rows[2:])

    assert usage_of(conn, "u1") == 2
    assert violations(conn) == []

    conn.execute("DELETE FROM user_usage WHERE user_id = 'u1'")
    assert violations(conn) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((None,), "p_max_attempts >= 1, not null"),
        ((0,), "p_max_attempts >= 1, not 0"),
        ((3, -1), "p_lease_grace_seconds >= 0, not -1"),
        ((3, float("nan")), "p_lease_grace_seconds >= 0, not NaN"),
        ((3, None), "p_lease_grace_seconds >= 0, not null"),
        ((3, 1, None), "p_report_usage_excess true or false"),
    ],
)
def test_bad_arguments_raise_a_clear_error(
    conn: Conn, args: tuple[object, ...], message: str
) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=message):
        violations(conn, *args)


def test_cli_prints_one_line_per_finding_and_exits_1(conn: Conn, dsn: str) -> None:
    broken = make_batch(conn, user_id="u1", n_docs=1)
    conn.execute(
        "UPDATE extraction_batches SET total_documents = 2 WHERE id = %s", (broken,)
    )
    conn.execute("UPDATE documents SET attempts = 4 WHERE batch_id = %s", (broken,))

    result = run_cli("check", dsn=dsn)

    lines = result.stdout.splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 2
    assert lines[0].startswith(f"attempts_exceeded batch={broken} document=")
    assert lines[1].startswith(f"batch_counts batch={broken} user=u1: ")
    assert "check: 2 violations" in result.stderr

    assert run_cli("check", "--max-attempts", "4", dsn=dsn).stdout.count("\n") == 1


def test_cli_says_clean_and_exits_0(conn: Conn, dsn: str) -> None:
    batch_id = make_batch(conn, n_docs=2)
    rows = claim(conn, batch_id=batch_id)
    conn.execute(
        "UPDATE documents SET lease_expires_at = now() - interval '10 seconds'"
        " WHERE id = %s",
        (rows[0]["document_id"],),
    )

    assert run_cli("check", "--lease-grace", "5", dsn=dsn).returncode == 1
    result = run_cli("check", "--lease-grace", "30", dsn=dsn)

    assert result.returncode == 0, result.stderr
    assert result.stdout == "check: clean\n"


def test_cli_refuses_a_bad_option(dsn: str) -> None:
    result = run_cli("check", "--max-attempts", "0", dsn=dsn)

    assert result.returncode == 2
    assert "--max-attempts" in result.stderr
    assert "Traceback" not in result.stderr
