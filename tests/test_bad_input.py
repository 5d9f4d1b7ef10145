"""Bad input: oversized content, fuzzed control functions, refused client updates.

Every fuzzed call must either raise a clear SQL error or leave the state
valid: listener_check() stays clean after each one, and a call naming ids
that do not exist changes nothing at all.
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import psycopg.errors
import pytest
from helpers import add_document, batch_row, claim, make_batch, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from listener.config import ProcessingSettings
from listener.errors import ConfigError

Conn = psycopg.Connection[Any]

HUGE = "x" * 1_000_000
FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
# SQLSTATE classes of a clear refusal: data exception, integrity constraint,
# syntax or access rule (no such function for these types), program limit,
# object in the wrong state, and RAISE in PL/pgSQL. Never XX (internal
# error), 53 (out of resources) or a lost connection.
CLEAR_CLASSES = {"22", "23", "42", "54", "55", "P0"}


def _doc(conn: Conn, document_id: uuid.UUID) -> tuple[Any, ...]:
    row = conn.execute(
        "SELECT status, attempts, error, processed_at IS NOT NULL, lease_token"
        " FROM documents WHERE id = %s",
        (document_id,),
    ).fetchone()
    assert row is not None
    return tuple(row)


def _violations(conn: Conn) -> list[tuple[Any, ...]]:
    """Return listener_check()'s findings, leases and attempts aside.

    Fuzzed lease times and attempt limits are the caller's own choice; what
    must never happen is a broken counter, batch state or charge.
    """
    return conn.execute("SELECT * FROM listener_check(1000000, 1e9)").fetchall()


def _fingerprint(conn: Conn) -> str:
    row = conn.execute(
        "SELECT md5(concat_ws('|',"
        " (SELECT string_agg(t::text, ',' ORDER BY t.id) FROM extraction_batches t),"
        " (SELECT string_agg(t::text, ',' ORDER BY t.id) FROM documents t),"
        " (SELECT string_agg(t::text, ',' ORDER BY t.user_id) FROM user_usage t)))"
    ).fetchone()
    assert row is not None
    return str(row[0])


def _call(conn: Conn, statement: str, args: list[Any]) -> psycopg.Error | None:
    """Run one call in its own transaction; return the error it raised, if any."""
    try:
        with conn.transaction():
            conn.execute(statement, args).fetchall()
    except psycopg.Error as exc:
        if exc.sqlstate is None:
            # Refused by psycopg before sending (a NUL in a text argument).
            assert isinstance(exc, psycopg.DataError | psycopg.ProgrammingError), exc
        else:
            assert exc.sqlstate[:2] in CLEAR_CLASSES, (exc.sqlstate, exc)
            assert exc.diag.message_primary
        assert conn.execute("SELECT 1").fetchone() == (1,)
        return exc
    return None


def _sql(function: str, n_args: int) -> str:
    # The function names are this file's constants; arguments stay parameters.
    return f"SELECT * FROM {function}({', '.join(['%s'] * n_args)})"  # noqa: S608


# --- oversized content --------------------------------------------------------


def test_oversized_document_fails_at_claim_without_its_content(conn: Conn) -> None:
    batch_id = make_batch(conn, user_id="u1", n_docs=2, content=b"small")
    big = add_document(conn, batch_id, content=b"y" * 5000, file_name="big.bin")
    at_limit = add_document(conn, batch_id, content=b"z" * 4096, file_name="edge")
    remote = add_document(conn, batch_id, content=None, file_name="remote")

    rows = conn.execute(
        "SELECT document_id, content FROM claim_batch('w', 100, 60, NULL, 4096)"
    ).fetchall()

    claimed = {r[0] for r in rows}
    assert big not in claimed
    assert {at_limit, remote} <= claimed
    assert len(claimed) == 4
    status, attempts, error, processed, token = _doc(conn, big)
    assert (status, attempts, processed, token) == ("failed", 0, True, None)
    assert error == "content is 5000 bytes, over the limit of 4096 bytes"
    assert batch_row(conn, batch_id)["failed_count"] == 1
    assert _violations(conn) == []


def test_batch_of_only_oversized_documents_fails_and_the_claim_moves_on(
    conn: Conn,
) -> None:
    oversized = make_batch(conn, user_id="u1", n_docs=3, content=b"z" * 100)
    small = make_batch(conn, user_id="u2", n_docs=2, content=b"ok")

    rows = claim_rows = conn.execute(
        "SELECT batch_id FROM claim_batch('w', 100, 60, NULL, 10)"
    ).fetchall()

    assert {r[0] for r in rows} == {small}
    assert len(claim_rows) == 2
    closed = batch_row(conn, oversized)
    assert (closed["status"], closed["failed_count"]) == ("failed", 3)
    assert closed["error"] == "all 3 documents failed"
    assert _violations(conn) == []


def test_oversized_document_fails_for_its_size_not_for_quota(conn: Conn) -> None:
    conn.execute("INSERT INTO user_usage (user_id, documents_limit) VALUES ('u1', 1)")
    batch_id = make_batch(conn, user_id="u1", n_docs=2, content=b"ok")
    big = add_document(conn, batch_id, content=b"b" * 50, file_name="big")

    rows = conn.execute(
        "SELECT document_id FROM claim_batch('w', 100, 60, NULL, 10)"
    ).fetchall()

    assert len(rows) == 1
    assert _doc(conn, big)[2] == "content is 50 bytes, over the limit of 10 bytes"
    waiting = conn.execute(
        "SELECT count(*) FROM documents WHERE batch_id = %s AND status = 'uploaded'",
        (batch_id,),
    ).fetchone()
    assert waiting == (1,)


def test_claim_without_a_limit_still_takes_four_arguments(conn: Conn) -> None:
    batch_id = make_batch(conn, n_docs=1, content=b"y" * 100_000)

    rows = claim(conn, batch_id=batch_id)

    assert [len(r["content"]) for r in rows] == [100_000]


def test_negative_limit_is_refused(conn: Conn) -> None:
    make_batch(conn, n_docs=1)

    with pytest.raises(
        psycopg.errors.InvalidParameterValue, match="p_max_content_bytes >= 0"
    ):
        conn.execute("SELECT * FROM claim_batch('w', 1, 60, NULL, -1)")


def test_max_content_bytes_setting_is_validated() -> None:
    assert ProcessingSettings(max_content_bytes=1).max_content_bytes == 1
    with pytest.raises(ConfigError, match="--max-content-bytes must be at least 1"):
        ProcessingSettings(max_content_bytes=0)


@pytest.mark.slow
def test_sweep_fails_oversized_documents_with_a_clear_reason(
    conn: Conn, dsn: str
) -> None:
    batch_id = make_batch(conn, user_id="u1", n_docs=3, content=b"fine text")
    big = add_document(conn, batch_id, content=b"word " * 1000, file_name="big.txt")

    done = run_cli("sweep", "--max-content-bytes", "1000", dsn=dsn)

    assert done.returncode == 0, done.stderr
    batch = batch_row(conn, batch_id)
    assert (batch["status"], batch["completed_count"], batch["failed_count"]) == (
        "partially_completed",
        3,
        1,
    )
    assert _doc(conn, big)[2] == "content is 5000 bytes, over the limit of 1000 bytes"
    assert run_cli("check", dsn=dsn).stdout == "check: clean\n"


def test_cli_refuses_a_zero_content_limit(dsn: str) -> None:
    result = run_cli("sweep", "--max-content-bytes", "0", dsn=dsn)

    assert result.returncode == 2
    assert "--max-content-bytes" in result.stderr
    assert "Traceback" not in result.stderr


# --- fuzzed control functions --------------------------------------------------

# Arguments of every wrong kind: psycopg sends each with its own type, so an
# int where a uuid belongs finds no such function, a str is parsed as a uuid.
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.just(HUGE),
    st.binary(max_size=16),
    st.uuids(),
    st.lists(st.uuids(), max_size=3),
    st.lists(st.text(max_size=8), max_size=3),
)


def _state(conn: Conn, n_docs: int = 4) -> tuple[uuid.UUID, list[dict[str, Any]]]:
    """Add a batch and claim some of its documents; return it and the claims."""
    batch_id = make_batch(conn, user_id="fuzz", n_docs=n_docs)
    return batch_id, claim(conn, worker="fuzz-w", batch_id=batch_id, max_docs=2)


@FUZZ
@given(data=st.data())
def test_batch_control_functions_refuse_or_keep_state_valid(
    conn: Conn, data: st.DataObject
) -> None:
    batch_id, _ = _state(conn)
    function = data.draw(st.sampled_from(["requeue_batch", "cancel_batch"]))
    args = data.draw(
        st.one_of(
            st.tuples(st.one_of(JUNK, st.just(batch_id), st.just(str(batch_id)))),
            st.lists(JUNK, max_size=3).map(tuple),
        )
    )
    unknown = len(args) == 1 and isinstance(args[0], uuid.UUID) and args[0] != batch_id
    before = _fingerprint(conn)

    error = _call(conn, _sql(function, len(args)), list(args))

    assert _violations(conn) == []
    if unknown:
        assert isinstance(error, psycopg.errors.NoDataFound)
        assert f"batch {args[0]} does not exist" in str(error)
    if error is not None or unknown:
        assert _fingerprint(conn) == before


@FUZZ
@given(
    worker=st.one_of(st.just("w"), JUNK),
    max_docs=st.one_of(st.integers(-5, 5), JUNK),
    lease=st.one_of(st.floats(-1, 100), JUNK),
    batch=st.one_of(st.none(), st.uuids(), JUNK),
    limit=st.one_of(st.none(), st.integers(-2, 20), JUNK),
)
def test_claim_batch_refuses_or_keeps_state_valid(
    conn: Conn, worker: Any, max_docs: Any, lease: Any, batch: Any, limit: Any
) -> None:
    _state(conn)

    error = _call(conn, _sql("claim_batch", 5), [worker, max_docs, lease, batch, limit])

    assert _violations(conn) == []
    if error is None:
        assert worker is not None and max_docs >= 1 and lease > 0


@FUZZ
@given(data=st.data())
def test_finish_documents_refuses_or_keeps_state_valid(
    conn: Conn, data: st.DataObject
) -> None:
    _, claims = _state(conn)
    ids = [c["document_id"] for c in claims]
    tokens = [c["lease_token"] for c in claims]
    n = len(ids)
    id_arg = data.draw(st.one_of(st.just(ids), st.just(ids + ids), JUNK))
    token_arg = data.draw(
        st.one_of(st.just(tokens), st.just(tokens[::-1]), st.just(tokens * 2), JUNK)
    )
    outcomes = data.draw(
        st.one_of(
            st.lists(st.sampled_from(["completed", "failed", "error"]), min_size=n),
            st.lists(st.text(max_size=10), max_size=4),
            JUNK,
        )
    )
    results = data.draw(
        st.one_of(
            st.just(
                Jsonb([{"ok": 1}] * len(outcomes) if isinstance(outcomes, list) else [])
            ),
            st.just(Jsonb({"not": "an array"})),
            st.just(Jsonb([HUGE] * n)),
            JUNK,
        )
    )
    errors = data.draw(st.one_of(st.just([None] * n), st.just([HUGE] * n), JUNK))
    tail = data.draw(
        st.lists(st.one_of(st.integers(-1, 5), st.floats(), JUNK), max_size=3)
    )

    error = _call(
        conn,
        _sql("finish_documents", 5 + len(tail)),
        [id_arg, token_arg, outcomes, results, errors, *tail],
    )

    assert _violations(conn) == []
    if error is None:
        # Charged exactly once per completed document, whatever came in.
        charged = conn.execute(
            "SELECT coalesce(sum(documents_processed), 0) FROM user_usage"
        ).fetchone()
        completed = conn.execute(
            "SELECT count(*) FROM documents WHERE status = 'completed'"
        ).fetchone()
        assert charged == completed


@FUZZ
@given(data=st.data())
def test_lease_and_sweep_functions_refuse_or_keep_state_valid(
    conn: Conn, data: st.DataObject
) -> None:
    _, claims = _state(conn)
    ids = [c["document_id"] for c in claims]
    tokens = [c["lease_token"] for c in claims]
    function, args = data.draw(
        st.one_of(
            st.tuples(
                st.sampled_from(["extend_leases", "release_documents"]),
                st.tuples(
                    st.one_of(st.just(ids), JUNK),
                    st.one_of(st.just(tokens), JUNK),
                    st.one_of(st.floats(-10, 10), JUNK),
                ),
            ),
            st.tuples(
                st.sampled_from(
                    ["recover_expired_leases", "sweep_candidates", "request_sweep"]
                ),
                st.lists(st.one_of(st.integers(-3, 3), JUNK), max_size=2).map(tuple),
            ),
            st.tuples(st.just("repair_batches"), st.lists(JUNK, max_size=1).map(tuple)),
        )
    )

    _call(conn, _sql(function, len(args)), list(args))

    assert _violations(conn) == []


@pytest.mark.parametrize(
    "args",
    [
        (None,),
        (0,),
        (-1,),
    ],
)
def test_recover_expired_leases_refuses_a_missing_maximum(
    conn: Conn, args: tuple[Any, ...]
) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="p_max_attempts"):
        conn.execute(_sql("recover_expired_leases", 1), args)


@pytest.mark.parametrize(
    ("tail", "message"),
    [
        ((None,), "p_max_attempts >= 1"),
        ((3, None), "retry delay"),
        ((3, float("nan")), "retry delay"),
        ((3, 5, float("inf")), "retry delay"),
        ((3, -1), "retry delay"),
    ],
)
def test_finish_documents_refuses_bad_retry_settings(
    conn: Conn, tail: tuple[Any, ...], message: str
) -> None:
    """A null maximum used to retry the document forever."""
    _, claims = _state(conn)
    before = _fingerprint(conn)

    with pytest.raises(psycopg.errors.InvalidParameterValue, match=message):
        conn.execute(
            _sql("finish_documents", 5 + len(tail)),
            [
                [c["document_id"] for c in claims],
                [c["lease_token"] for c in claims],
                ["error"] * len(claims),
                Jsonb([None] * len(claims)),
                ["boom"] * len(claims),
                *tail,
            ],
        )
    assert _fingerprint(conn) == before


@pytest.mark.parametrize(
    "shape",
    ["fewer tokens", "fewer outcomes", "fewer errors", "fewer results", "object"],
)
def test_finish_documents_refuses_arrays_that_do_not_pair_up(
    conn: Conn, shape: str
) -> None:
    _, claims = _state(conn)
    ids = [c["document_id"] for c in claims]
    tokens = [c["lease_token"] for c in claims]
    outcomes = ["completed"] * len(ids)
    results: Any = Jsonb([{}] * len(ids))
    errors: list[str | None] = [None] * len(ids)
    if shape == "fewer tokens":
        tokens = tokens[:1]
    elif shape == "fewer outcomes":
        outcomes = outcomes[:1]
    elif shape == "fewer errors":
        errors = errors[:1]
    elif shape == "fewer results":
        results = Jsonb([{}])
    else:
        results = Jsonb({"a": 1})

    with pytest.raises(psycopg.errors.InvalidParameterValue, match="one lease token"):
        conn.execute(
            _sql("finish_documents", 5), [ids, tokens, outcomes, results, errors]
        )


def test_duplicate_ids_in_one_finish_charge_once(conn: Conn) -> None:
    batch_id, claims = _state(conn, n_docs=2)
    (first, second) = claims

    rows = conn.execute(
        _sql("finish_documents", 5),
        [
            [first["document_id"]] * 2 + [second["document_id"]],
            [first["lease_token"]] * 2 + [second["lease_token"]],
            ["completed", "completed", "failed"],
            Jsonb([{}, {}, None]),
            [None, None, "bad"],
        ],
    ).fetchall()

    assert [r[1] for r in rows] == ["completed", "completed", "failed"]
    batch = batch_row(conn, batch_id)
    assert (batch["status"], batch["completed_count"], batch["failed_count"]) == (
        "partially_completed",
        1,
        1,
    )
    assert _violations(conn) == []


# --- client updates the database refuses ----------------------------------------

# Every CHECK constraint on the contract tables, with a client statement it
# refuses. test_every_check_constraint_is_exercised keeps the list complete.
REFUSED = [
    (
        "UPDATE extraction_batches SET status = 'done'",
        "extraction_batches_status_check",
    ),
    (
        "UPDATE extraction_batches SET completed_count = total_documents + 1",
        "extraction_batches_counts_check",
    ),
    (
        "UPDATE extraction_batches SET failed_count = -1",
        "extraction_batches_counts_check",
    ),
    (
        "UPDATE extraction_batches SET status = 'completed'",
        "extraction_batches_completed_at_check",
    ),
    (
        "UPDATE extraction_batches SET completed_at = now()",
        "extraction_batches_completed_at_check",
    ),
    ("UPDATE documents SET status = 'done'", "documents_status_check"),
    ("UPDATE documents SET attempts = -1", "documents_attempts_check"),
    ("UPDATE documents SET status = 'processing'", "documents_lease_check"),
    (
        "UPDATE documents SET lease_token = gen_random_uuid(),"
        " lease_expires_at = now()",
        "documents_lease_check",
    ),
    (
        "INSERT INTO user_usage (user_id, documents_processed) VALUES ('u', -1)",
        "user_usage_documents_processed_check",
    ),
    (
        "INSERT INTO user_usage (user_id, documents_limit) VALUES ('u', -1)",
        "user_usage_documents_limit_check",
    ),
]


@pytest.mark.parametrize(("statement", "constraint"), REFUSED)
def test_invalid_client_update_is_refused_by_a_named_constraint(
    conn: Conn, statement: str, constraint: str
) -> None:
    make_batch(conn, n_docs=1)
    before = _fingerprint(conn)

    with pytest.raises(psycopg.errors.CheckViolation) as refused:
        conn.execute(statement)

    assert refused.value.diag.constraint_name == constraint
    assert _fingerprint(conn) == before


def test_every_check_constraint_is_exercised(conn: Conn) -> None:
    rows = conn.execute(
        "SELECT conname FROM pg_constraint WHERE contype = 'c' AND conrelid IN"
        " ('extraction_batches'::regclass, 'documents'::regclass,"
        " 'user_usage'::regclass)"
    ).fetchall()

    assert {name for (name,) in rows} == {constraint for _, constraint in REFUSED}


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        (
            "INSERT INTO documents (batch_id, user_id, file_name, status)"
            " SELECT id, 'u', 'f', 'completed' FROM extraction_batches",
            "documents must be inserted as uploaded",
        ),
        (
            "INSERT INTO extraction_batches (user_id, status)"
            " VALUES ('u', 'completed')",
            "a new batch cannot start as completed",
        ),
    ],
)
def test_inserts_in_a_finished_state_are_refused(
    conn: Conn, statement: str, message: str
) -> None:
    make_batch(conn, n_docs=1)

    with pytest.raises(psycopg.errors.CheckViolation, match=message):
        conn.execute(statement)


def test_document_into_a_finished_batch_is_refused_naming_the_batch(
    conn: Conn,
) -> None:
    batch_id = make_batch(conn, n_docs=1)
    conn.execute("SELECT cancel_batch(%s)", (batch_id,))

    with pytest.raises(
        psycopg.errors.CheckViolation, match=f"batch {batch_id} is already cancelled"
    ):
        add_document(conn, batch_id)
