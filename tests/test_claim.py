"""The stored functions, called as SQL: claim, finish, leases, quota, fencing, races."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta
from typing import Any

import orjson
import psycopg
import psycopg.errors
import pytest
from helpers import add_document, batch_row, claim, finish, make_batch, usage_of

Conn = psycopg.Connection[Any]


def _doc(conn: Conn, document_id: uuid.UUID) -> dict[str, Any]:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        row = cur.execute("SELECT * FROM documents WHERE id = %s", (document_id,))
        found = row.fetchone()
    assert found is not None
    return found


def _docs(conn: Conn, batch_id: uuid.UUID) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute(
            "SELECT * FROM documents WHERE batch_id = %s ORDER BY file_name",
            (batch_id,),
        ).fetchall()


def _expire_leases(conn: Conn, ids: list[uuid.UUID]) -> None:
    conn.execute(
        "UPDATE documents SET lease_expires_at = now() - interval '1 second'"
        " WHERE id = ANY(%s)",
        (ids,),
    )


def _set_limit(conn: Conn, user_id: str, limit: int, used: int = 0) -> None:
    conn.execute(
        "INSERT INTO user_usage (user_id, documents_processed, documents_limit)"
        " VALUES (%s, %s, %s)",
        (user_id, used, limit),
    )


def _wait_until_blocked(conn: Conn, pid: int) -> None:
    """Return once backend `pid` waits on a lock; fail after 10 s."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        row = conn.execute(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
        if row is not None and row[0] == "Lock":
            return
        time.sleep(0.01)
    pytest.fail(f"backend {pid} never waited on a lock")


def _finished_notifications(listener: Conn, sender: Conn) -> list[dict[str, Any]]:
    """Return the batch_finished payloads received before a sentinel sent now.

    Notifications arrive in commit order, so everything committed before the
    sentinel is in the list: no waiting for "long enough".
    """
    sender.execute("SELECT pg_notify('batch_finished', 'sentinel')")
    payloads: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for notify in listener.notifies(timeout=1):
            if notify.payload == "sentinel":
                return payloads
            payloads.append(orjson.loads(notify.payload))
    pytest.fail("the sentinel notification never arrived")


# --- claiming ---------------------------------------------------------------


def test_claim_leases_documents_and_starts_the_batch(conn: Conn) -> None:
    batch_id = make_batch(conn, n_docs=3)

    claimed = claim(conn, "w1", max_docs=2, lease_seconds=30)

    assert len(claimed) == 2
    assert {c["batch_id"] for c in claimed} == {batch_id}
    assert {c["attempt"] for c in claimed} == {1}
    assert len({c["lease_token"] for c in claimed}) == 1
    assert claimed[0]["content"] == b"hello world"
    for c in claimed:
        doc = _doc(conn, c["document_id"])
        assert doc["status"] == "processing"
        assert doc["attempts"] == 1
        assert doc["lease_owner"] == "w1"
        assert doc["lease_token"] == c["lease_token"]
        assert doc["lease_expires_at"] == c["lease_expires_at"]
    assert batch_row(conn, batch_id)["status"] == "processing"
    waiting = [d for d in _docs(conn, batch_id) if d["status"] == "uploaded"]
    assert len(waiting) == 1


def test_claim_never_hands_out_a_processing_document_twice(conn: Conn) -> None:
    make_batch(conn, n_docs=3)

    first = claim(conn, "w1", max_docs=2)
    second = claim(conn, "w2", max_docs=2)
    third = claim(conn, "w3", max_docs=2)

    ids = [c["document_id"] for c in first + second]
    assert len(ids) == len(set(ids)) == 3
    assert third == []


def test_claim_refuses_bad_arguments(conn: Conn) -> None:
    make_batch(conn)

    with pytest.raises(psycopg.errors.InvalidParameterValue):
        claim(conn, "w1", max_docs=0)
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        claim(conn, "w1", lease_seconds=0)


def test_uploading_batch_is_not_claimed_until_queued(conn: Conn) -> None:
    batch_id = make_batch(conn, n_docs=2, status="uploading")

    before = claim(conn)
    conn.execute(
        "UPDATE extraction_batches SET status = 'queued' WHERE id = %s", (batch_id,)
    )
    after = claim(conn)

    assert before == []
    assert len(after) == 2


def test_claim_with_a_batch_id_takes_only_that_batch(conn: Conn) -> None:
    make_batch(conn, n_docs=2)
    wanted = make_batch(conn, n_docs=2)

    claimed = claim(conn, batch_id=wanted)

    assert {c["batch_id"] for c in claimed} == {wanted}
    assert len(claimed) == 2


def test_small_batch_is_served_between_slices_of_a_huge_one(conn: Conn) -> None:
    huge = make_batch(conn, n_docs=30)
    small = make_batch(conn, n_docs=2)

    first = claim(conn, "w1", max_docs=10)
    second = claim(conn, "w2", max_docs=10)
    third = claim(conn, "w3", max_docs=10)

    assert {c["batch_id"] for c in first} == {huge}
    assert {c["batch_id"] for c in second} == {small}
    assert {c["batch_id"] for c in third} == {huge}
    assert len(first) == len(third) == 10


def test_claim_takes_the_oldest_batch_first(conn: Conn) -> None:
    newer = make_batch(conn, n_docs=1)
    older = make_batch(
        conn, n_docs=1, created_at=batch_row(conn, newer)["created_at"] - timedelta(1)
    )

    claimed = claim(conn, max_docs=1)

    assert [c["batch_id"] for c in claimed] == [older]


def test_empty_queued_batch_fails_with_no_documents(conn: Conn) -> None:
    batch_id = make_batch(conn, n_docs=0)

    claimed = claim(conn)

    batch = batch_row(conn, batch_id)
    assert claimed == []
    assert batch["status"] == "failed"
    assert batch["error"] == "batch has no documents"
    assert batch["completed_at"] is not None


# --- completing and failing -------------------------------------------------


def test_completion_stores_the_result_and_charges_once(conn: Conn) -> None:
    batch_id = make_batch(conn, user_id="u1", n_docs=1)
    claimed = claim(conn)

    outcome = finish(conn, claimed, result={"words": 2})
    again = finish(conn, claimed, result={"words": 3})

    doc = _doc(conn, claimed[0]["document_id"])
    batch = batch_row(conn, batch_id)
    assert [o["outcome"] for o in outcome] == ["completed"]
    assert [o["outcome"] for o in again] == ["stale"]
    assert doc["status"] == "completed"
    assert doc["result"] == {"words": 2}
    assert doc["processed_at"] is not None
    assert doc["lease_token"] is None
    assert usage_of(conn, "u1") == 1
    assert batch["status"] == "completed"
    assert (batch["completed_count"], batch["failed_count"]) == (1, 0)
    assert batch["completed_at"] is not None


def test_one_call_finishes_documents_of_several_batches(conn: Conn) -> None:
    first = make_batch(conn, user_id="u1", n_docs=2)
    second = make_batch(conn, user_id="u2", n_docs=2)
    claimed = claim(conn, batch_id=first) + claim(conn, batch_id=second)

    outcomes = finish(conn, claimed)

    assert [o["outcome"] for o in outcomes] == ["completed"] * 4
    assert [o["document_id"] for o in outcomes] == [c["document_id"] for c in claimed]
    assert (usage_of(conn, "u1"), usage_of(conn, "u2")) == (2, 2)
    for batch_id in (first, second):
        batch = batch_row(conn, batch_id)
        assert (batch["status"], batch["completed_count"]) == ("completed", 2)


def test_finish_refuses_an_unknown_outcome(conn: Conn) -> None:
    make_batch(conn, n_docs=1)
    claimed = claim(conn)

    with pytest.raises(psycopg.errors.InvalidParameterValue):
        finish(conn, claimed, "done")


def test_permanent_failure_is_not_retried_nor_charged(conn: Conn) -> None:
    batch_id = make_batch(conn, n_docs=1)
    claimed = claim(conn)

    outcome = finish(conn, claimed, "failed", error="unreadable", max_attempts=5)

    doc = _doc(conn, claimed[0]["document_id"])
    assert [o["outcome"] for o in outcome] == ["failed"]
    assert (doc["status"], doc["error"], doc["result"]) == (
        "failed",
        "unreadable",
        None,
    )
    assert usage_of(conn, "u1") == 0
    assert batch_row(conn, batch_id)["status"] == "failed"


def test_batch_with_all_documents_failed_is_failed(conn: Conn) -> None:
    batch_id = make_batch(conn, n_docs=2)

    finish(conn, claim(conn), "failed", error="bad")

    batch = batch_row(conn, batch_id)
    assert batch["status"] == "failed"
    assert (batch["completed_count"], batch["failed_count"]) == (0, 2)
    assert batch["error"] == "all 2 documents failed"
    assert batch["completed_at"] is not None


def test_batch_with_some_documents_failed_is_partially_completed(conn: Conn) -> None:
    batch_id = make_batch(conn, n_docs=3)
    claimed = claim(conn)

    finish(conn, claimed[:1], "failed", error="bad")
    middle = batch_row(conn, batch_id)
    finish(conn, claimed[1:])

    batch = batch_row(conn, batch_id)
    assert (middle["status"], middle["completed_at"]) == ("processing", None)
    assert batch["status"] == "partially_completed"
    assert (batch["completed_count"], batch["failed_count"]) == (2, 1)
    assert batch["error"] == "1 of 3 documents failed"
    assert batch["completed_at"] is not None


# --- retries ----------------------------------------------------------------


def test_error_is_retried_until_max_attempts_then_fails_with_last_error(
    conn: Conn,
) -> None:
    batch_id = make_batch(conn, n_docs=1)
    verdicts = []
    attempts = []

    for attempt in (1, 2, 3):
        claimed = claim(conn)
        attempts.append([c["attempt"] for c in claimed])
        outcome = finish(conn, claimed, "error", error=f"boom {attempt}")
        verdicts.append(outcome[0]["outcome"])

    doc = _doc(conn, claimed[0]["document_id"])
    assert attempts == [[1], [2], [3]]
    assert verdicts == ["retrying", "retrying", "failed"]
    assert (doc["status"], doc["attempts"], doc["error"]) == ("failed", 3, "boom 3")
    assert claim(conn) == []
    assert batch_row(conn, batch_id)["status"] == "failed"
    assert usage_of(conn, "u1") == 0


def test_retry_with_zero_delay_is_due_at_once(conn: Conn) -> None:
    make_batch(conn, n_docs=1)
    finish(conn, claim(conn), "error", error="boom", retry_delay=0)

    doc = _doc(conn, claim(conn)[0]["document_id"])

    assert (doc["status"], doc["attempts"]) == ("processing", 2)


def test_retry_waits_out_its_delay(conn: Conn) -> None:
    batch_id = make_batch(conn, n_docs=1)
    claimed = claim(conn)

    outcome = finish(conn, claimed, "error", error="boom", retry_delay=60)

    doc = _doc(conn, claimed[0]["document_id"])
    candidates = conn.execute("SELECT batch_id FROM sweep_candidates(10)").fetchall()
    assert outcome[0]["outcome"] == "retrying"
    assert outcome[0]["available_at"] == doc["available_at"]
    assert (doc["status"], doc["error"]) == ("uploaded", "boom")
    assert claim(conn) == []
    assert candidates == []
    conn.execute(
        "UPDATE documents SET available_at = now() WHERE batch_id = %s", (batch_id,)
    )
    assert [c["attempt"] for c in claim(conn)] == [2]


def test_retry_delay_doubles_per_attempt_up_to_the_cap(conn: Conn) -> None:
    make_batch(conn, n_docs=1)
    delays = []

    for _ in range(4):
        claimed = claim(conn)
        with conn.transaction():
            outcome = finish(
                conn, claimed, "error", max_attempts=9, retry_delay=10, retry_cap=50
            )
            row = conn.execute("SELECT now()").fetchone()
        assert row is not None
        delays.append((outcome[0]["available_at"] - row[0]).total_seconds())
        conn.execute(
            "UPDATE documents SET available_at = now() WHERE id = %s",
            (claimed[0]["document_id"],),
        )

    assert delays == [10, 20, 40, 50]


# --- leases and fencing -----------------------------------------------------


def test_stale_token_after_lease_loss_changes_nothing(conn: Conn) -> None:
    """A worker whose lease expired and was re-claimed cannot complete or charge."""
    make_batch(conn, user_id="u1", n_docs=1)
    first = claim(conn, "w1")
    _expire_leases(conn, [first[0]["document_id"]])
    recovered = conn.execute("SELECT * FROM recover_expired_leases(3)").fetchone()
    second = claim(conn, "w2")
    before = _doc(conn, first[0]["document_id"])

    late = finish(conn, first, result={"from": "w1"})

    after = _doc(conn, first[0]["document_id"])
    assert recovered == (1, 0)
    assert [c["document_id"] for c in second] == [first[0]["document_id"]]
    assert second[0]["attempt"] == 2
    assert [o["outcome"] for o in late] == ["stale"]
    assert after == before
    assert (after["status"], after["lease_owner"]) == ("processing", "w2")
    assert usage_of(conn, "u1") == 0

    finish(conn, second, result={"from": "w2"})
    assert _doc(conn, first[0]["document_id"])["result"] == {"from": "w2"}
    assert usage_of(conn, "u1") == 1


def test_completion_after_cancel_is_refused(conn: Conn) -> None:
    batch_id = make_batch(conn, user_id="u1", n_docs=3)
    claimed = claim(conn, max_docs=1)
    row = conn.execute("SELECT cancel_batch(%s)", (batch_id,)).fetchone()

    late = finish(conn, claimed)

    batch = batch_row(conn, batch_id)
    assert row == (3,)
    assert [o["outcome"] for o in late] == ["stale"]
    assert usage_of(conn, "u1") == 0
    assert {(d["status"], d["error"]) for d in _docs(conn, batch_id)} == {
        ("failed", "cancelled")
    }
    assert (batch["status"], batch["failed_count"], batch["error"]) == (
        "cancelled",
        3,
        "cancelled",
    )
    assert batch["completed_at"] is not None


def test_cancel_refuses_a_terminal_batch(conn: Conn) -> None:
    batch_id = make_batch(conn, n_docs=1)
    finish(conn, claim(conn))

    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as caught:
        conn.execute("SELECT cancel_batch(%s)", (batch_id,))

    assert f"batch {batch_id} is already completed" in str(caught.value)


def test_extend_leases_needs_the_current_token(conn: Conn) -> None:
    make_batch(conn, n_docs=1)
    claimed = claim(conn, lease_seconds=5)
    document_id = claimed[0]["document_id"]

    wrong = conn.execute(
        "SELECT extend_leases(%s, %s, 600)", ([document_id], [uuid.uuid4()])
    ).fetchall()
    right = conn.execute(
        "SELECT extend_leases(%s, %s, 600)",
        ([document_id], [claimed[0]["lease_token"]]),
    ).fetchall()

    doc = _doc(conn, document_id)
    assert wrong == []
    assert right == [(document_id,)]
    assert doc["lease_expires_at"] > claimed[0]["lease_expires_at"] + timedelta(
        seconds=500
    )


@pytest.mark.parametrize(("unstarted", "attempts"), [(True, 0), (False, 1)])
def test_released_documents_are_uploaded_again(
    conn: Conn, unstarted: bool, attempts: int
) -> None:
    make_batch(conn, n_docs=2)
    claimed = claim(conn)

    row = conn.execute(
        "SELECT release_documents(%s, %s, %s)",
        (
            [c["document_id"] for c in claimed],
            [c["lease_token"] for c in claimed],
            unstarted,
        ),
    ).fetchone()

    assert row == (2,)
    for c in claimed:
        doc = _doc(conn, c["document_id"])
        assert (doc["status"], doc["attempts"], doc["lease_token"]) == (
            "uploaded",
            attempts,
            None,
        )
    assert len(claim(conn)) == 2


def test_expired_lease_on_last_attempt_fails_as_worker_lost(conn: Conn) -> None:
    batch_id = make_batch(conn, n_docs=1)
    for _ in range(2):
        claimed = claim(conn, "w-dead")
        _expire_leases(conn, [claimed[0]["document_id"]])
        conn.execute("SELECT * FROM recover_expired_leases(2)")

    doc = _doc(conn, claimed[0]["document_id"])
    batch = batch_row(conn, batch_id)
    assert (doc["status"], doc["attempts"]) == ("failed", 2)
    assert "worker w-dead was lost" in doc["error"]
    assert (batch["status"], batch["failed_count"]) == ("failed", 1)


def test_live_leases_are_not_recovered(conn: Conn) -> None:
    make_batch(conn, n_docs=1)
    claimed = claim(conn)

    recovered = conn.execute("SELECT * FROM recover_expired_leases(3)").fetchone()

    assert recovered == (0, 0)
    assert _doc(conn, claimed[0]["document_id"])["status"] == "processing"


# --- quota ------------------------------------------------------------------


def test_documents_beyond_the_quota_fail_without_a_claim(conn: Conn) -> None:
    _set_limit(conn, "u1", limit=5, used=3)
    batch_id = make_batch(conn, user_id="u1", n_docs=4)

    first = claim(conn)
    finish(conn, first)
    second = claim(conn)

    docs = _docs(conn, batch_id)
    over = [d for d in docs if d["status"] == "failed"]
    batch = batch_row(conn, batch_id)
    assert len(first) == 2
    assert second == []
    assert len(over) == 2
    assert all("quota exhausted" in d["error"] for d in over)
    assert all(d["attempts"] == 0 for d in over)
    assert usage_of(conn, "u1") == 5
    assert (batch["status"], batch["completed_count"], batch["failed_count"]) == (
        "partially_completed",
        2,
        2,
    )


def test_user_without_quota_left_gets_nothing_claimed(conn: Conn) -> None:
    _set_limit(conn, "u1", limit=0)
    batch_id = make_batch(conn, user_id="u1", n_docs=3)

    claimed = claim(conn)

    batch = batch_row(conn, batch_id)
    assert claimed == []
    assert (batch["status"], batch["failed_count"]) == ("failed", 3)


def test_other_users_are_not_held_back_by_a_quota(conn: Conn) -> None:
    _set_limit(conn, "limited", limit=0)
    make_batch(conn, user_id="limited", n_docs=2)
    free = make_batch(conn, user_id="free", n_docs=2)

    claimed = claim(conn)

    assert {c["batch_id"] for c in claimed} == {free}


@pytest.mark.parametrize("round_", range(3))
def test_concurrent_claims_never_overshoot_a_quota(dsn: str, round_: int) -> None:
    limit, workers = 5, 4
    with psycopg.connect(dsn, autocommit=True) as setup:
        _set_limit(setup, "u1", limit=limit)
        for _ in range(3):
            make_batch(setup, user_id="u1", n_docs=4)
    barrier = threading.Barrier(workers)
    claimed: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def claim_all(worker: str) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as own:
                barrier.wait(timeout=10)
                while rows := claim(own, worker, max_docs=2):
                    claimed.extend(rows)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=claim_all, args=(f"w{i}",)) for i in range(workers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert errors == []
    assert len(claimed) == limit
    with psycopg.connect(dsn, autocommit=True) as check:
        finish(check, claimed)
        assert claim(check) == []
        assert usage_of(check, "u1") == limit
        failed = check.execute(
            "SELECT count(*) FROM documents"
            " WHERE status = 'failed' AND error LIKE 'quota exhausted%'"
        ).fetchone()
        assert failed == (12 - limit,)


# --- the last two documents ------------------------------------------------


# Outcomes of the last two documents, and the batch status they must give.
# Failures charge no usage, so two of them meet only at the batch row.
RACES = [
    pytest.param(("completed", "completed"), "completed", id="both-completed"),
    pytest.param(("failed", "failed"), "failed", id="both-failed"),
    pytest.param(("completed", "failed"), "partially_completed", id="mixed"),
]


def _two_claimed_documents(conn: Conn) -> tuple[uuid.UUID, list[dict[str, Any]]]:
    batch_id = make_batch(conn, n_docs=2)
    claimed = claim(conn, "wA", max_docs=1) + claim(conn, "wB", max_docs=1)
    assert len({c["document_id"] for c in claimed}) == 2
    return batch_id, claimed


def _assert_closed_once(
    conn: Conn,
    batch_id: uuid.UUID,
    notified: list[dict[str, Any]],
    outcomes: tuple[str, str],
    status: str,
) -> None:
    completed = outcomes.count("completed")
    batch = batch_row(conn, batch_id)
    assert [n["batch_id"] for n in notified] == [str(batch_id)]
    assert notified[0]["status"] == status
    assert notified[0]["completed_count"] == completed
    assert batch["status"] == status
    assert batch["completed_at"] is not None
    assert (batch["completed_count"], batch["failed_count"]) == (
        completed,
        2 - completed,
    )
    assert usage_of(conn, "u1") == completed


def _finish_and_commit(
    own: Conn, claimed: dict[str, Any], outcome: str, errors: list[BaseException]
) -> None:
    try:
        finish(own, [claimed], outcome, error="bad")
        own.commit()
    except BaseException as exc:
        errors.append(exc)


@pytest.mark.parametrize("round_", range(3))
@pytest.mark.parametrize(("outcomes", "status"), RACES)
def test_last_two_documents_finishing_at_once_close_the_batch_once(
    dsn: str, conn: Conn, outcomes: tuple[str, str], status: str, round_: int
) -> None:
    """The second finisher blocks behind the first, then sees its counts."""
    batch_id, (doc_a, doc_b) = _two_claimed_documents(conn)
    conn.execute("LISTEN batch_finished")
    errors: list[BaseException] = []

    with (
        psycopg.connect(dsn) as conn_a,
        psycopg.connect(dsn) as conn_b,
    ):
        finish(conn_a, [doc_a], outcomes[0], error="bad")
        finisher = threading.Thread(
            target=_finish_and_commit, args=(conn_b, doc_b, outcomes[1], errors)
        )
        finisher.start()
        _wait_until_blocked(conn, conn_b.info.backend_pid)
        conn_a.commit()
        finisher.join(timeout=30)

    notified = _finished_notifications(conn, conn)
    assert errors == []
    _assert_closed_once(conn, batch_id, notified, outcomes, status)


@pytest.mark.parametrize("round_", range(3))
@pytest.mark.parametrize(("outcomes", "status"), RACES)
def test_last_two_documents_released_by_a_barrier_close_the_batch_once(
    dsn: str, conn: Conn, outcomes: tuple[str, str], status: str, round_: int
) -> None:
    batch_id, claimed = _two_claimed_documents(conn)
    conn.execute("LISTEN batch_finished")
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def finish_one(row: dict[str, Any], outcome: str) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as own:
                barrier.wait(timeout=10)
                finish(own, [row], outcome, error="bad")
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=finish_one, args=pair)
        for pair in zip(claimed, outcomes, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    notified = _finished_notifications(conn, conn)
    assert errors == []
    _assert_closed_once(conn, batch_id, notified, outcomes, status)


# --- repair, candidates, requeue -------------------------------------------


def test_repair_closes_a_batch_whose_documents_are_all_terminal(conn: Conn) -> None:
    batch_id = make_batch(conn, n_docs=3)
    # As if a function had been interrupted: documents finished, batch not.
    conn.execute(
        "UPDATE documents SET status = 'completed' WHERE batch_id = %s"
        " AND file_name <> 'doc-0.txt'",
        (batch_id,),
    )
    conn.execute(
        "UPDATE documents SET status = 'failed' WHERE batch_id = %s"
        " AND file_name = 'doc-0.txt'",
        (batch_id,),
    )
    conn.execute("LISTEN batch_finished")

    repaired = conn.execute("SELECT repair_batches()").fetchone()
    again = conn.execute("SELECT repair_batches()").fetchone()

    batch = batch_row(conn, batch_id)
    notified = _finished_notifications(conn, conn)
    assert (repaired, again) == ((1,), (0,))
    assert batch["status"] == "partially_completed"
    assert (batch["completed_count"], batch["failed_count"]) == (2, 1)
    assert batch["completed_at"] is not None
    assert [n["batch_id"] for n in notified] == [str(batch_id)]


def test_sweep_candidates_are_the_batches_with_due_work_oldest_first(
    conn: Conn,
) -> None:
    now = batch_row(conn, make_batch(conn, n_docs=0, status="uploading"))["created_at"]
    newest = make_batch(conn, n_docs=1, created_at=now)
    oldest = make_batch(conn, n_docs=1, created_at=now - timedelta(hours=2))
    middle = make_batch(conn, n_docs=1, created_at=now - timedelta(hours=1))
    done = make_batch(conn, n_docs=1, created_at=now - timedelta(hours=3))
    finish(conn, claim(conn, batch_id=done))
    waiting = make_batch(conn, n_docs=1, created_at=now - timedelta(hours=4))
    finish(conn, claim(conn, batch_id=waiting), "error", retry_delay=600)

    rows = conn.execute("SELECT batch_id FROM sweep_candidates(10)").fetchall()
    limited = conn.execute("SELECT batch_id FROM sweep_candidates(2)").fetchall()

    assert [r[0] for r in rows] == [oldest, middle, newest]
    assert [r[0] for r in limited] == [oldest, middle]


def test_requeue_reopens_a_batch_with_its_failed_documents(conn: Conn) -> None:
    batch_id = make_batch(conn, n_docs=2)
    claimed = claim(conn)
    finish(conn, claimed[:1], "failed", error="bad")
    finish(conn, claimed[1:])

    row = conn.execute("SELECT requeue_batch(%s)", (batch_id,)).fetchone()
    reopened = batch_row(conn, batch_id)
    finish(conn, claim(conn))

    batch = batch_row(conn, batch_id)
    assert row == (1,)
    assert (reopened["status"], reopened["failed_count"]) == ("queued", 0)
    assert reopened["completed_at"] is None
    assert (batch["status"], batch["completed_count"]) == ("completed", 2)
    assert usage_of(conn, "u1") == 2


# --- the schema's own rules -------------------------------------------------


@pytest.mark.parametrize("terminal", ["completed", "failed", "cancelled"])
def test_insert_into_a_terminal_batch_names_the_batch_and_state(
    conn: Conn, terminal: str
) -> None:
    batch_id = make_batch(conn, n_docs=1)
    if terminal == "cancelled":
        conn.execute("SELECT cancel_batch(%s)", (batch_id,))
    else:
        finish(conn, claim(conn), terminal, error="bad")

    with pytest.raises(psycopg.errors.CheckViolation) as caught:
        add_document(conn, batch_id)

    assert f"batch {batch_id} is already {terminal}" in str(caught.value)
    assert batch_row(conn, batch_id)["total_documents"] == 1


def test_counters_are_the_databases_own(conn: Conn) -> None:
    row = conn.execute(
        "INSERT INTO extraction_batches"
        " (user_id, total_documents, completed_count, failed_count)"
        " VALUES ('u1', 99, 7, 3) RETURNING id"
    ).fetchone()
    assert row is not None
    batch_id = row[0]

    empty = batch_row(conn, batch_id)
    document_id = add_document(conn, batch_id)
    add_document(conn, batch_id)
    two = batch_row(conn, batch_id)["total_documents"]
    conn.execute("DELETE FROM documents WHERE id = %s", (document_id,))

    assert (empty["total_documents"], empty["completed_count"]) == (0, 0)
    assert empty["failed_count"] == 0
    assert two == 2
    assert batch_row(conn, batch_id)["total_documents"] == 1


def test_a_batch_cannot_be_inserted_terminal(conn: Conn) -> None:
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            "INSERT INTO extraction_batches (user_id, status)"
            " VALUES ('u1', 'completed')"
        )


@pytest.mark.parametrize(
    ("statement", "constraint"),
    [
        (
            "UPDATE extraction_batches SET status = 'done'",
            "extraction_batches_status_check",
        ),
        (
            "INSERT INTO extraction_batches (user_id, status) VALUES ('u1', 'new')",
            "extraction_batches_status_check",
        ),
        ("UPDATE documents SET status = 'lost'", "documents_status_check"),
        (
            "UPDATE documents SET attempts = -1",
            "documents_attempts_check",
        ),
        (
            "UPDATE documents SET status = 'processing'",
            "documents_lease_check",
        ),
        (
            "INSERT INTO user_usage (user_id, documents_limit) VALUES ('u9', -1)",
            "user_usage_documents_limit_check",
        ),
    ],
)
def test_invalid_values_are_refused_by_named_checks(
    conn: Conn, statement: str, constraint: str
) -> None:
    make_batch(conn, n_docs=1)

    with pytest.raises(psycopg.errors.CheckViolation) as caught:
        conn.execute(statement)

    assert caught.value.diag.constraint_name == constraint


def test_documents_need_an_existing_batch(conn: Conn) -> None:
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute(
            "INSERT INTO documents (batch_id, user_id, file_name)"
            " VALUES (gen_random_uuid(), 'u1', 'x')"
        )
