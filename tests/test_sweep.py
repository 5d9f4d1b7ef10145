"""`listener sweep` as cron runs it: a real process against a real database."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import (
    add_document,
    batch_row,
    claim,
    extractor_env,
    make_batch,
    recorded_calls,
    run_cli,
    usage_of,
)

pytestmark = pytest.mark.slow

Conn = psycopg.Connection[Any]


def _sweep(
    dsn: str,
    *options: str,
    record: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run one `listener sweep`; assert it exited 0 with a one-line summary."""
    done = run_cli(
        "sweep", *options, dsn=dsn, env={**extractor_env(record), **(env or {})}
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    assert lines[0].startswith("sweep: ")
    return done


def _docs(conn: Conn, batch_id: uuid.UUID) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute(
            "SELECT * FROM documents WHERE batch_id = %s ORDER BY file_name",
            (batch_id,),
        ).fetchall()


def _counts(batch: dict[str, Any]) -> tuple[str, int, int, int]:
    return (
        batch["status"],
        batch["total_documents"],
        batch["completed_count"],
        batch["failed_count"],
    )


# --- the seed plan ----------------------------------------------------------


def test_three_document_batch_is_done_in_one_run(conn: Conn, dsn: str) -> None:
    batch_id = make_batch(conn, user_id="u1", n_docs=3, content=b"hello big world\n")

    done = _sweep(dsn)

    batch = batch_row(conn, batch_id)
    docs = _docs(conn, batch_id)
    assert done.stdout.strip() == (
        "sweep: 1 batches touched, 3 documents completed, 0 failed, 0 retrying, "
        "0 recovered from dead workers (0 of them out of attempts), "
        "0 batches repaired"
    )
    assert _counts(batch) == ("completed", 3, 3, 0)
    assert batch["completed_at"] is not None
    assert usage_of(conn, "u1") == 3
    assert {d["status"] for d in docs} == {"completed"}
    assert (
        docs[0]["result"]["sha256"] == hashlib.sha256(b"hello big world\n").hexdigest()
    )
    assert docs[0]["result"]["words"] == 3
    assert all(d["attempts"] == 1 for d in docs)


def test_large_batch_is_done_over_three_runs(conn: Conn, dsn: str) -> None:
    batch_id = make_batch(conn, user_id="u1", n_docs=25)
    seen = []

    for _ in range(3):
        _sweep(dsn, "--max-docs-per-batch-run", "10")
        batch = batch_row(conn, batch_id)
        seen.append(
            (
                batch["completed_count"],
                batch["status"],
                usage_of(conn, "u1"),
                batch["completed_at"] is not None,
            )
        )

    assert seen == [
        (10, "processing", 10, False),
        (20, "processing", 20, False),
        (25, "completed", 25, True),
    ]


def test_some_binary_documents_make_a_partially_completed_batch(
    conn: Conn, dsn: str
) -> None:
    batch_id = make_batch(conn, user_id="u1", n_docs=2)
    binary = add_document(conn, batch_id, content=b"\x89PNG\r\n\x1a\n\xff\xfe")

    _sweep(dsn)

    batch = batch_row(conn, batch_id)
    failed = [d for d in _docs(conn, batch_id) if d["status"] == "failed"]
    assert _counts(batch) == ("partially_completed", 3, 2, 1)
    assert batch["completed_at"] is not None
    assert [d["id"] for d in failed] == [binary]
    assert "not UTF-8" in failed[0]["error"]
    assert failed[0]["attempts"] == 1
    assert usage_of(conn, "u1") == 2


def test_all_documents_failing_make_a_failed_batch(conn: Conn, dsn: str) -> None:
    batch_id = make_batch(conn, user_id="u1", n_docs=2, content=b"\xff\x00\xfe")

    _sweep(dsn)

    batch = batch_row(conn, batch_id)
    assert _counts(batch) == ("failed", 2, 0, 2)
    assert batch["error"] == "all 2 documents failed"
    assert usage_of(conn, "u1") == 0


def test_max_batches_per_run_takes_the_oldest_first(conn: Conn, dsn: str) -> None:
    now = batch_row(conn, make_batch(conn, n_docs=1, status="uploading"))["created_at"]
    # Inserted newest first, so insertion order cannot pass for age order.
    newest = make_batch(conn, n_docs=2, created_at=now)
    middle = make_batch(conn, n_docs=2, created_at=now - timedelta(minutes=1))
    oldest = make_batch(conn, n_docs=2, created_at=now - timedelta(minutes=2))

    done = _sweep(dsn, "--max-batches-per-run", "2")

    statuses = [batch_row(conn, b)["status"] for b in (oldest, middle, newest)]
    assert statuses == ["completed", "completed", "queued"]
    assert "2 batches touched, 4 documents completed" in done.stdout


def test_empty_queued_batch_is_failed_by_a_sweep(conn: Conn, dsn: str) -> None:
    batch_id = make_batch(conn, n_docs=0)

    _sweep(dsn)

    batch = batch_row(conn, batch_id)
    assert (batch["status"], batch["error"]) == ("failed", "batch has no documents")


def test_sweep_with_nothing_to_do_exits_zero(conn: Conn, dsn: str) -> None:
    done = _sweep(dsn)

    assert "0 batches touched, 0 documents completed" in done.stdout


# --- extractors through the command line -------------------------------------


@pytest.mark.parametrize("name", ["record", "record_async"])
def test_sync_and_async_extractors_complete_documents(
    conn: Conn, dsn: str, tmp_path: Path, name: str
) -> None:
    batch_id = make_batch(conn, n_docs=2)
    record = tmp_path / "calls"

    _sweep(dsn, "--extractor", f"extractors_for_tests:{name}", record=record)

    docs = _docs(conn, batch_id)
    assert [d["result"]["file_name"] for d in docs] == ["doc-0.txt", "doc-1.txt"]
    assert sorted(doc for doc, _ in recorded_calls(record)) == sorted(
        str(d["id"]) for d in docs
    )
    assert batch_row(conn, batch_id)["status"] == "completed"


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("returns_list", "extractor returned list, not a mapping"),
        ("returns_unserialisable", "not JSON-serialisable"),
        ("returns_nul", "NUL character"),
        ("permanent", "unreadable doc-0.txt"),
    ],
)
def test_unusable_results_fail_the_document_at_once(
    conn: Conn, dsn: str, name: str, error: str
) -> None:
    batch_id = make_batch(conn, n_docs=1)

    _sweep(dsn, "--extractor", f"extractors_for_tests:{name}", "--retry-delay", "0")

    (doc,) = _docs(conn, batch_id)
    assert (doc["status"], doc["attempts"], doc["result"]) == ("failed", 1, None)
    assert error in doc["error"]
    assert batch_row(conn, batch_id)["status"] == "failed"


# --- retries and timeouts ---------------------------------------------------


def _sweep_until_terminal(
    conn: Conn, dsn: str, document_id: uuid.UUID, runs: int, *options: str, **kw: Any
) -> list[tuple[str, int]]:
    """Sweep until the document is terminal, at most `runs` times.

    A retry that is due at once may be claimed again by the same run, so a run
    can make more than one try; return (status, attempts) after each run.
    """
    states = []
    for _ in range(runs):
        _sweep(dsn, *options, **kw)
        (doc,) = _docs(conn, _batch_of(conn, document_id))
        states.append((doc["status"], doc["attempts"]))
        if doc["status"] in ("completed", "failed"):
            break
    return states


def _batch_of(conn: Conn, document_id: uuid.UUID) -> uuid.UUID:
    row = conn.execute(
        "SELECT batch_id FROM documents WHERE id = %s", (document_id,)
    ).fetchone()
    assert row is not None
    batch_id = row[0]
    assert isinstance(batch_id, uuid.UUID)
    return batch_id


@pytest.mark.parametrize("name", ["always_raise", "always_raise_async"])
def test_raising_extractor_is_retried_until_max_attempts(
    conn: Conn, dsn: str, tmp_path: Path, name: str
) -> None:
    batch_id = make_batch(conn, n_docs=1)
    ((document_id,),) = conn.execute("SELECT id FROM documents").fetchall()
    record = tmp_path / "calls"
    options = ("--extractor", f"extractors_for_tests:{name}", "--retry-delay", "0")

    states = _sweep_until_terminal(
        conn, dsn, document_id, 3, *options, "--max-attempts", "3", record=record
    )

    (doc,) = _docs(conn, batch_id)
    assert states[-1] == ("failed", 3)
    assert all(status == "uploaded" for status, _ in states[:-1])
    assert doc["error"].endswith("boom on attempt 3")
    assert [attempt for _, attempt in recorded_calls(record)] == [1, 2, 3]
    assert batch_row(conn, batch_id)["status"] == "failed"
    assert usage_of(conn, "u1") == 0


def test_retry_after_a_flaky_first_try_completes(
    conn: Conn, dsn: str, tmp_path: Path
) -> None:
    batch_id = make_batch(conn, n_docs=1)
    ((document_id,),) = conn.execute("SELECT id FROM documents").fetchall()
    record = tmp_path / "calls"
    options = ("--extractor", "extractors_for_tests:fail_first_try")

    states = _sweep_until_terminal(
        conn, dsn, document_id, 2, *options, "--retry-delay", "0", record=record
    )

    (doc,) = _docs(conn, batch_id)
    assert states[-1] == ("completed", 2)
    assert [attempt for _, attempt in recorded_calls(record)] == [1, 2]
    assert doc["result"] == {"attempt": 2}
    assert doc["error"] is None
    assert usage_of(conn, "u1") == 1


def test_retry_delay_keeps_the_document_back_until_due(
    conn: Conn, dsn: str, tmp_path: Path
) -> None:
    batch_id = make_batch(conn, n_docs=1)
    record = tmp_path / "calls"
    options = (
        "--extractor",
        "extractors_for_tests:always_raise",
        "--retry-delay",
        "60",
    )

    _sweep(dsn, *options, record=record)
    second = _sweep(dsn, *options, record=record)

    (doc,) = _docs(conn, batch_id)
    due = conn.execute(
        "SELECT available_at > now() + interval '50 seconds' FROM documents"
        " WHERE id = %s",
        (doc["id"],),
    ).fetchone()
    assert (doc["status"], doc["attempts"]) == ("uploaded", 1)
    assert due == (True,)
    assert "0 batches touched" in second.stdout
    assert len(recorded_calls(record)) == 1
    assert claim(conn) == []
    assert batch_row(conn, batch_id)["status"] == "processing"


@pytest.mark.parametrize("name", ["sleep_async", "sleep_sync"])
def test_extraction_timeout_is_a_retryable_error(
    conn: Conn, dsn: str, tmp_path: Path, name: str
) -> None:
    batch_id = make_batch(conn, n_docs=1)
    ((document_id,),) = conn.execute("SELECT id FROM documents").fetchall()
    record = tmp_path / "calls"
    options = (
        "--extractor",
        f"extractors_for_tests:{name}",
        "--extract-timeout",
        "0.2",
        "--retry-delay",
        "0",
        "--max-attempts",
        "2",
    )
    # The sync extractor's thread cannot be interrupted; keep its sleep short.
    env = {"LISTENER_TEST_SLEEP": "30" if name == "sleep_async" else "1"}

    states = _sweep_until_terminal(
        conn, dsn, document_id, 2, *options, env=env, record=record
    )

    (doc,) = _docs(conn, batch_id)
    assert states[-1] == ("failed", 2)
    assert [attempt for _, attempt in recorded_calls(record)] == [1, 2]
    assert doc["error"] == "extraction timed out after 0.2 s"


# --- quota ------------------------------------------------------------------


def test_documents_over_quota_fail_without_calling_the_extractor(
    conn: Conn, dsn: str, tmp_path: Path
) -> None:
    conn.execute(
        "INSERT INTO user_usage (user_id, documents_processed, documents_limit)"
        " VALUES ('u1', 1, 3)"
    )
    batch_id = make_batch(conn, user_id="u1", n_docs=5)
    record = tmp_path / "calls"

    # Documents kept back only by those in flight wait for the next run.
    for _ in range(2):
        _sweep(dsn, "--extractor", "extractors_for_tests:record", record=record)

    docs = _docs(conn, batch_id)
    completed = {str(d["id"]) for d in docs if d["status"] == "completed"}
    over = [d for d in docs if d["status"] == "failed"]
    assert len(completed) == 2
    assert len(over) == 3
    assert all("quota exhausted" in d["error"] for d in over)
    assert {doc for doc, _ in recorded_calls(record)} == completed
    assert len(recorded_calls(record)) == 2
    assert usage_of(conn, "u1") == 3
    assert _counts(batch_row(conn, batch_id)) == ("partially_completed", 5, 2, 3)


def test_user_at_quota_gets_no_extraction(conn: Conn, dsn: str, tmp_path: Path) -> None:
    conn.execute(
        "INSERT INTO user_usage (user_id, documents_processed, documents_limit)"
        " VALUES ('u1', 4, 4)"
    )
    batch_id = make_batch(conn, user_id="u1", n_docs=3)
    record = tmp_path / "calls"

    _sweep(dsn, "--extractor", "extractors_for_tests:record", record=record)

    assert recorded_calls(record) == []
    assert _counts(batch_row(conn, batch_id)) == ("failed", 3, 0, 3)
    assert usage_of(conn, "u1") == 4


# --- dead workers -----------------------------------------------------------


def test_expired_lease_is_recovered_and_processed(conn: Conn, dsn: str) -> None:
    batch_id = make_batch(conn, user_id="u1", n_docs=2)
    dead = claim(conn, "w-dead", max_docs=1)
    conn.execute(
        "UPDATE documents SET lease_expires_at = now() - interval '1 second'"
        " WHERE id = %s",
        (dead[0]["document_id"],),
    )

    done = _sweep(dsn)

    docs = {d["id"]: d for d in _docs(conn, batch_id)}
    assert "1 recovered from dead workers (0 of them out of attempts)" in done.stdout
    assert docs[dead[0]["document_id"]]["status"] == "completed"
    assert docs[dead[0]["document_id"]]["attempts"] == 2
    assert _counts(batch_row(conn, batch_id)) == ("completed", 2, 2, 0)
    assert usage_of(conn, "u1") == 2


def test_live_lease_of_another_worker_is_left_alone(conn: Conn, dsn: str) -> None:
    batch_id = make_batch(conn, user_id="u1", n_docs=2)
    held = claim(conn, "w-alive", max_docs=1)

    _sweep(dsn)

    docs = {d["id"]: d for d in _docs(conn, batch_id)}
    assert docs[held[0]["document_id"]]["status"] == "processing"
    assert docs[held[0]["document_id"]]["lease_owner"] == "w-alive"
    assert _counts(batch_row(conn, batch_id)) == ("processing", 2, 1, 0)


def test_lease_expiring_on_the_last_attempt_fails_as_worker_lost(
    conn: Conn, dsn: str
) -> None:
    batch_id = make_batch(conn, n_docs=1)
    dead = claim(conn, "w-dead")
    conn.execute(
        "UPDATE documents SET attempts = 3,"
        " lease_expires_at = now() - interval '1 second' WHERE id = %s",
        (dead[0]["document_id"],),
    )

    done = _sweep(dsn, "--max-attempts", "3")

    (doc,) = _docs(conn, batch_id)
    assert "(1 of them out of attempts)" in done.stdout
    assert (doc["status"], doc["attempts"]) == ("failed", 3)
    assert "worker w-dead was lost" in doc["error"]
    assert _counts(batch_row(conn, batch_id)) == ("failed", 1, 0, 1)


def test_sweep_repairs_a_batch_left_open(conn: Conn, dsn: str) -> None:
    batch_id = make_batch(conn, n_docs=2)
    conn.execute(
        "UPDATE documents SET status = 'completed' WHERE batch_id = %s", (batch_id,)
    )

    done = _sweep(dsn)

    assert "1 batches repaired" in done.stdout
    assert _counts(batch_row(conn, batch_id)) == ("completed", 2, 2, 0)


# --- sweeps at the same time ------------------------------------------------


def test_two_concurrent_sweeps_process_every_document_once(
    conn: Conn, dsn: str, tmp_path: Path
) -> None:
    batches = [make_batch(conn, user_id=f"u{i}", n_docs=15) for i in range(4)]
    record = tmp_path / "calls"
    env = {
        **{k: v for k, v in os.environ.items() if k != "DATABASE_URL"},
        **extractor_env(record),
        "DATABASE_URL": dsn,
        "LISTENER_TEST_SLEEP": "0.05",
    }
    command = [
        sys.executable,
        "-m",
        "listener",
        "sweep",
        "--extractor",
        "extractors_for_tests:slow_record",
        "--concurrency",
        "2",
    ]

    sweeps = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [sweep.communicate(timeout=60) for sweep in sweeps]

    assert [sweep.returncode for sweep in sweeps] == [0, 0], outputs
    calls = Counter(doc for doc, _ in recorded_calls(record))
    completed = sum(
        int(out.split(" batches touched, ")[1].split()[0]) for out, _ in outputs
    )
    assert len(calls) == 60
    assert set(calls.values()) == {1}
    assert completed == 60
    for i, batch_id in enumerate(batches):
        assert _counts(batch_row(conn, batch_id)) == ("completed", 15, 15, 0)
        assert usage_of(conn, f"u{i}") == 15
    row = conn.execute(
        "SELECT count(*), max(attempts) FROM documents WHERE status = 'completed'"
    ).fetchone()
    assert row == (60, 1)
