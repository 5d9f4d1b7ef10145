"""Property-based tests: random interleavings of the stored functions keep every
invariant.

A hypothesis state machine drives several workers through claim, complete,
fail, error and retry, lease expiry, heartbeats, hand-backs, sweeps, requeue
and cancel, against a real database. It keeps a model of what each worker
holds and what the database told it, and after every step checks:
listener_check() is clean, no document is held by two live leases, a finish
is refused (stale) exactly when the lease was lost, and every user's usage
equals the completions the workers were told about.

One database per test function; the tables are emptied between examples.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg.errors
from hypothesis import HealthCheck, settings, target
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from psycopg.types.json import Jsonb

Conn = psycopg.Connection[Any]

MAX_ATTEMPTS = 3
WORKERS = ("w1", "w2", "w3")
USERS = ("alice", "bob")
TERMINAL = {"completed", "partially_completed", "failed", "cancelled"}


@dataclass
class Hold:
    """A document a worker claimed, under the lease token the claim returned."""

    document_id: uuid.UUID
    batch_id: uuid.UUID
    user_id: str
    token: uuid.UUID
    expired: bool = False
    # The lease is gone: recovered after expiry, or revoked by cancel_batch.
    lost: bool = False


def _check(conn: Conn, lease_grace: float = 3600) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT * FROM listener_check(%s, %s)", (MAX_ATTEMPTS, lease_grace)
    ).fetchall()


class Processing(RuleBasedStateMachine):
    """Workers and an operator acting on one database in random order."""

    conn: Conn

    def __init__(self) -> None:
        super().__init__()
        self.conn.execute(
            "TRUNCATE extraction_batches, documents, user_usage, listener_usage_ledger"
        )
        self.holds: dict[str, dict[uuid.UUID, Hold]] = {w: {} for w in WORKERS}
        self.batches: list[uuid.UUID] = []
        # Completions the database reported to a worker, per user.
        self.told_completed: Counter[str] = Counter()
        self.highest_attempt = 0

    # --- arranging work -------------------------------------------------------

    @initialize(user=st.sampled_from(USERS), n_docs=st.integers(1, 4))
    def first_batch(self, user: str, n_docs: int) -> None:
        self.insert_batch(user, n_docs, "queued")

    @rule(
        user=st.sampled_from(USERS),
        n_docs=st.integers(0, 4),
        status=st.sampled_from(["queued", "queued", "uploading"]),
    )
    def insert_batch(self, user: str, n_docs: int, status: str) -> None:
        with self.conn.transaction():
            row = self.conn.execute(
                "INSERT INTO extraction_batches (user_id, status) VALUES (%s, %s)"
                " RETURNING id",
                (user, status),
            ).fetchone()
            assert row is not None
            self.conn.execute(
                "INSERT INTO documents (batch_id, user_id, file_name, content)"
                " SELECT %s, %s, 'doc-' || i, 'text' FROM generate_series(1, %s) i",
                (row[0], user, n_docs),
            )
        self.batches.append(row[0])

    @precondition(lambda self: self.batches)
    @rule(data=st.data(), n_docs=st.integers(1, 3))
    def add_documents(self, data: st.DataObject, n_docs: int) -> None:
        batch_id = data.draw(st.sampled_from(self.batches))
        status = self._batch_status(batch_id)
        try:
            self.conn.execute(
                "INSERT INTO documents (batch_id, user_id, file_name)"
                " SELECT id, user_id, 'late' FROM extraction_batches, "
                " generate_series(1, %s) WHERE id = %s",
                (n_docs, batch_id),
            )
        except psycopg.errors.CheckViolation as exc:
            assert status in TERMINAL
            assert f"batch {batch_id} is already {status}" in str(exc)
        else:
            assert status not in TERMINAL

    @precondition(lambda self: self.batches)
    @rule(data=st.data())
    def release_upload(self, data: st.DataObject) -> None:
        batch_id = data.draw(st.sampled_from(self.batches))
        self.conn.execute(
            "UPDATE extraction_batches SET status = 'queued'"
            " WHERE id = %s AND status = 'uploading'",
            (batch_id,),
        )

    @rule(user=st.sampled_from(USERS), headroom=st.integers(0, 3))
    def set_quota(self, user: str, headroom: int) -> None:
        self.conn.execute(
            "INSERT INTO user_usage (user_id, documents_limit) VALUES (%s, %s)"
            " ON CONFLICT (user_id) DO UPDATE"
            " SET documents_limit = user_usage.documents_processed + %s",
            (user, headroom, headroom),
        )

    # --- workers --------------------------------------------------------------

    @rule(worker=st.sampled_from(WORKERS), max_docs=st.integers(1, 4))
    def claim(self, worker: str, max_docs: int) -> None:
        rows = self.conn.execute(
            "SELECT document_id, batch_id, user_id, lease_token, attempt"
            " FROM claim_batch(%s, %s, 60)",
            (worker, max_docs),
        ).fetchall()
        assert len(rows) <= max_docs
        self.highest_attempt = max([self.highest_attempt, *(r[4] for r in rows)])
        for document_id, batch_id, user_id, token, attempt in rows:
            live = [
                w
                for w, held in self.holds.items()
                if document_id in held and not held[document_id].lost
            ]
            # A live lease only ends by expiry and recovery, which marks it lost.
            assert live == [], f"{document_id} claimed while {live} hold it"
            assert 1 <= attempt <= MAX_ATTEMPTS
            self.holds[worker][document_id] = Hold(
                document_id, batch_id, user_id, token
            )

    @precondition(lambda self: any(self.holds.values()))
    @rule(
        data=st.data(),
        outcome=st.sampled_from(["completed", "failed", "error", "error"]),
    )
    def finish(self, data: st.DataObject, outcome: str) -> None:
        worker = data.draw(st.sampled_from([w for w in WORKERS if self.holds[w]]))
        held = list(self.holds[worker].values())
        chosen = data.draw(
            st.lists(
                st.sampled_from(held),
                min_size=1,
                unique_by=lambda h: h.document_id,
            )
        )
        rows = self.conn.execute(
            "SELECT document_id, outcome FROM finish_documents(%s, %s, %s, %s, %s,"
            " %s, 0, 0)",
            (
                [h.document_id for h in chosen],
                [h.token for h in chosen],
                [outcome] * len(chosen),
                Jsonb([{"by": worker}] * len(chosen)),
                [None if outcome == "completed" else "boom"] * len(chosen),
                MAX_ATTEMPTS,
            ),
        ).fetchall()
        assert [r[0] for r in rows] == [h.document_id for h in chosen]
        for hold, (_, verdict) in zip(chosen, rows, strict=True):
            del self.holds[worker][hold.document_id]
            # Fencing: refused exactly when the lease was lost.
            assert (verdict == "stale") == hold.lost, (hold, verdict)
            if verdict == "completed":
                assert outcome == "completed"
                self.told_completed[hold.user_id] += 1
            elif verdict != "stale":
                assert outcome != "completed"

    @precondition(lambda self: any(self.holds.values()))
    @rule(data=st.data())
    def expire_lease(self, data: st.DataObject) -> None:
        """Let time pass for one lease: it is past its expiry, not yet recovered."""
        worker = data.draw(st.sampled_from([w for w in WORKERS if self.holds[w]]))
        hold = data.draw(st.sampled_from(list(self.holds[worker].values())))
        self.conn.execute(
            "UPDATE documents SET lease_expires_at = now() - interval '1 second'"
            " WHERE id = %s AND lease_token = %s",
            (hold.document_id, hold.token),
        )
        hold.expired = True

    @precondition(lambda self: any(self.holds.values()))
    @rule(worker=st.sampled_from(WORKERS))
    def heartbeat(self, worker: str) -> None:
        held = list(self.holds[worker].values())
        rows = self.conn.execute(
            "SELECT extend_leases(%s, %s, 60)",
            ([h.document_id for h in held], [h.token for h in held]),
        ).fetchall()
        assert {r[0] for r in rows} == {h.document_id for h in held if not h.lost}
        for hold in held:
            hold.expired = False

    @precondition(lambda self: any(self.holds.values()))
    @rule(worker=st.sampled_from(WORKERS), unstarted=st.booleans())
    def hand_back(self, worker: str, unstarted: bool) -> None:
        held = list(self.holds[worker].values())
        row = self.conn.execute(
            "SELECT release_documents(%s, %s, %s, %s)",
            (
                [h.document_id for h in held],
                [h.token for h in held],
                unstarted,
                MAX_ATTEMPTS,
            ),
        ).fetchone()
        assert row == (sum(not h.lost for h in held),)
        self.holds[worker].clear()

    # --- the sweep and the operator ---------------------------------------------

    @rule()
    def sweep(self) -> None:
        self.conn.execute("SELECT * FROM recover_expired_leases(%s)", (MAX_ATTEMPTS,))
        self.conn.execute("SELECT repair_batches()")
        for held in self.holds.values():
            for hold in held.values():
                if hold.expired:
                    hold.lost = True
        # Nothing is left behind with an expired lease.
        assert [f for f in _check(self.conn, 0) if f[0] == "lease_expired"] == []

    @precondition(lambda self: self.batches)
    @rule(data=st.data())
    def requeue(self, data: st.DataObject) -> None:
        batch_id = data.draw(st.sampled_from(self.batches))
        failed_before = self._count(batch_id, "failed")
        try:
            row = self.conn.execute("SELECT requeue_batch(%s)", (batch_id,)).fetchone()
        except psycopg.errors.ObjectNotInPrerequisiteState:
            assert failed_before == 0 or self._batch_status(batch_id) == "uploading"
            return
        assert row == (failed_before,)
        assert self._batch_status(batch_id) not in TERMINAL

    @precondition(lambda self: self.batches)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        batch_id = data.draw(st.sampled_from(self.batches))
        before = self._batch_status(batch_id)
        try:
            self.conn.execute("SELECT cancel_batch(%s)", (batch_id,))
        except psycopg.errors.ObjectNotInPrerequisiteState:
            assert before in TERMINAL
            return
        assert self._batch_status(batch_id) == "cancelled"
        for held in self.holds.values():
            for hold in held.values():
                if hold.batch_id == batch_id:
                    hold.lost = True

    # --- invariants -------------------------------------------------------------

    @invariant()
    def consistent(self) -> None:
        assert _check(self.conn) == []

    @invariant()
    def usage_is_exact(self) -> None:
        charged = dict(
            self.conn.execute(
                "SELECT user_id, documents_processed FROM user_usage"
                " WHERE documents_processed > 0"
            ).fetchall()
        )
        completed = dict(
            self.conn.execute(
                "SELECT user_id, count(*) FROM documents WHERE status = 'completed'"
                " GROUP BY user_id"
            ).fetchall()
        )
        told = {u: n for u, n in self.told_completed.items() if n}
        assert charged == told
        assert completed == told

    @invariant()
    def live_leases_match_the_database(self) -> None:
        live = {
            (h.document_id, h.token)
            for held in self.holds.values()
            for h in held.values()
            if not h.lost
        }
        rows = self.conn.execute(
            "SELECT id, lease_token FROM documents WHERE status = 'processing'"
        ).fetchall()
        assert set(map(tuple, rows)) == live

    def teardown(self) -> None:
        # Steer the search towards documents on their last tries.
        target(float(self.highest_attempt), label="highest attempt")

    # --- helpers ----------------------------------------------------------------

    def _batch_status(self, batch_id: uuid.UUID) -> str:
        row = self.conn.execute(
            "SELECT status FROM extraction_batches WHERE id = %s", (batch_id,)
        ).fetchone()
        assert row is not None
        return str(row[0])

    def _count(self, batch_id: uuid.UUID, status: str) -> int:
        row = self.conn.execute(
            "SELECT count(*) FROM documents WHERE batch_id = %s AND status = %s",
            (batch_id, status),
        ).fetchone()
        assert row is not None
        return int(row[0])


def test_random_interleavings_keep_every_invariant(conn: Conn) -> None:
    Processing.conn = conn
    run_state_machine_as_test(
        Processing,
        settings=settings(
            max_examples=40,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture],
        ),
    )


def test_a_try_handed_back_at_shutdown_counts_towards_max_attempts(conn: Conn) -> None:
    """Found by the state machine's model: a started try handed back on its last
    attempt was claimed again as attempt max + 1."""
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO extraction_batches (user_id) VALUES ('u1') RETURNING id"
        ).fetchone()
        assert row is not None
        conn.execute(
            "INSERT INTO documents (batch_id, user_id, file_name, content)"
            " VALUES (%s, 'u1', 'poison', 'x')",
            (row[0],),
        )
    for _ in range(MAX_ATTEMPTS - 1):
        ((doc, token),) = conn.execute(
            "SELECT document_id, lease_token FROM claim_batch('w', 1, 60)"
        ).fetchall()
        conn.execute(
            "SELECT * FROM finish_documents(%s, %s, '{error}', '[null]', '{hung}',"
            " %s, 0, 0)",
            ([doc], [token], MAX_ATTEMPTS),
        )
    ((doc, token, attempt),) = conn.execute(
        "SELECT document_id, lease_token, attempt FROM claim_batch('w', 1, 60)"
    ).fetchall()

    conn.execute(
        "SELECT release_documents(%s, %s, false, %s)", ([doc], [token], MAX_ATTEMPTS)
    )

    assert attempt == MAX_ATTEMPTS
    assert conn.execute("SELECT * FROM claim_batch('w', 1, 60)").fetchall() == []
    assert conn.execute(
        "SELECT status, attempts, error FROM documents WHERE id = %s", (doc,)
    ).fetchone() == ("failed", 3, "worker w stopped during attempt 3 of 3")
    assert conn.execute(
        "SELECT status, failed_count FROM extraction_batches WHERE id = %s", (row[0],)
    ).fetchone() == ("failed", 1)
    assert _check(conn) == []
