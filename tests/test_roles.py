"""Least privilege: listener_create_roles() and what each role can and cannot do.

Roles belong to the whole server, so every test makes its own, with unique
names, and drops them before its database goes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg.errors
import pytest
from helpers import batch_row, make_batch, run_cli, usage_of
from psycopg import sql
from psycopg.conninfo import make_conninfo

Conn = psycopg.Connection[Any]


@dataclass(frozen=True)
class Roles:
    """The two roles of one test, and DSNs that log in as each."""

    listener: str
    app: str
    listener_dsn: str
    app_dsn: str


def _drop_role(conn: Conn, role: str) -> None:
    if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.fixture
def roles(conn: Conn, dsn: str) -> Iterator[Roles]:
    """Create a listener role and an application role that can log in."""
    suffix = uuid.uuid4().hex[:10]
    made = Roles(
        f"lw_{suffix}",
        f"la_{suffix}",
        make_conninfo(dsn, user=f"lw_{suffix}"),
        make_conninfo(dsn, user=f"la_{suffix}"),
    )
    conn.execute("SELECT listener_create_roles(%s, %s)", (made.listener, made.app))
    for role in (made.listener, made.app):
        conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        yield made
    finally:
        for role in (made.listener, made.app):
            _drop_role(conn, role)


def _as(dsn: str) -> Conn:
    return psycopg.connect(dsn, autocommit=True)


def _upload(app: Conn, n_docs: int = 2, status: str = "uploading") -> uuid.UUID:
    """Insert a batch and its documents as the application does."""
    with app.transaction():
        row = app.execute(
            "INSERT INTO extraction_batches (user_id, status) VALUES ('u1', %s)"
            " RETURNING id",
            (status,),
        ).fetchone()
        assert row is not None
        app.execute(
            "INSERT INTO documents (batch_id, user_id, file_name, content)"
            " SELECT %s, 'u1', 'doc-' || i, 'some text' FROM generate_series(1, %s) i",
            (row[0], n_docs),
        )
    batch_id = row[0]
    assert isinstance(batch_id, uuid.UUID)
    return batch_id


# --- the application role ----------------------------------------------------


def test_application_uploads_queues_and_cancels_its_own_batches(
    conn: Conn, roles: Roles
) -> None:
    with _as(roles.app_dsn) as app:
        queued = _upload(app)
        cancelled = _upload(app, n_docs=3, status="queued")
        app.execute("LISTEN batch_work")

        status = app.execute("SELECT app_queue_batch(%s)", (queued,)).fetchone()
        count = app.execute("SELECT app_cancel_batch(%s)", (cancelled,)).fetchone()
        heard = [n.payload for n in app.notifies(timeout=1, stop_after=1)]
        seen = app.execute(
            "SELECT status, total_documents, created_by FROM extraction_batches"
            " WHERE id = %s",
            (queued,),
        ).fetchone()

    assert status == ("queued",)
    assert count == (3,)
    assert heard == [str(queued)]
    assert seen == ("queued", 2, roles.app)
    assert batch_row(conn, cancelled)["status"] == "cancelled"
    assert conn.execute("SELECT * FROM listener_check()").fetchall() == []


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT * FROM user_usage",
        "INSERT INTO user_usage (user_id, documents_limit) VALUES ('u1', 1000)",
        "SELECT * FROM claim_batch('app', 10, 60)",
        "SELECT * FROM finish_documents(ARRAY[%(doc)s]::uuid[],"
        " ARRAY[gen_random_uuid()], ARRAY['completed'], '[{}]', ARRAY[NULL])",
        "SELECT * FROM extend_leases(ARRAY[%(doc)s]::uuid[], ARRAY[gen_random_uuid()],"
        " 60)",
        "SELECT * FROM recover_expired_leases(3)",
        "SELECT repair_batches()",
        "SELECT request_sweep()",
        "SELECT requeue_batch(%(batch)s)",
        "SELECT cancel_batch(%(batch)s)",
        "SELECT * FROM listener_check()",
        "SELECT extraction_batches_add_outcomes(ARRAY[%(batch)s]::uuid[],"
        " ARRAY[1], ARRAY[0])",
        "UPDATE documents SET status = 'failed', error = 'x', processed_at = now()",
        "UPDATE extraction_batches SET status = 'queued'",
        "DELETE FROM documents",
        "INSERT INTO documents (batch_id, user_id, file_name, attempts)"
        " VALUES (%(batch)s, 'u1', 'x', 7)",
        "INSERT INTO extraction_batches (user_id, created_by) VALUES ('u1', 'other')",
        "TRUNCATE documents",
    ],
)
def test_application_cannot_claim_complete_charge_or_rewrite(
    conn: Conn, roles: Roles, statement: str
) -> None:
    with _as(roles.app_dsn) as app:
        batch_id = _upload(app, status="queued")
        doc = app.execute(
            "SELECT id FROM documents WHERE batch_id = %s LIMIT 1", (batch_id,)
        ).fetchone()
        assert doc is not None

        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute(statement, {"doc": doc[0], "batch": batch_id})

    assert batch_row(conn, batch_id)["status"] == "queued"
    assert usage_of(conn, "u1") == 0


def test_application_cannot_queue_or_cancel_a_batch_it_did_not_insert(
    conn: Conn, roles: Roles
) -> None:
    others = make_batch(conn, n_docs=1, status="uploading")

    with _as(roles.app_dsn) as app:
        for function in ("app_queue_batch", "app_cancel_batch"):
            with pytest.raises(
                psycopg.errors.InsufficientPrivilege,
                match=f"batch {others} belongs to another role, not to {roles.app}",
            ):
                app.execute(
                    sql.SQL("SELECT {}(%s)").format(sql.Identifier(function)),
                    (others,),
                )
        with pytest.raises(psycopg.errors.NoDataFound, match="does not exist"):
            app.execute("SELECT app_cancel_batch(%s)", (uuid.uuid4(),))

    assert batch_row(conn, others)["status"] == "uploading"


def test_ownership_follows_set_role_too(conn: Conn, roles: Roles) -> None:
    """A connection pool that logs in as one role and SET ROLEs per request."""
    conn.execute(
        sql.SQL("GRANT {} TO {}").format(
            sql.Identifier(roles.app), sql.Identifier(roles.listener)
        )
    )
    with _as(roles.listener_dsn) as pooled:
        pooled.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(roles.app)))
        batch_id = _upload(pooled)
        queued = pooled.execute("SELECT app_queue_batch(%s)", (batch_id,)).fetchone()
        pooled.execute("RESET ROLE")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            pooled.execute("SELECT app_cancel_batch(%s)", (batch_id,))

    assert queued == ("queued",)
    assert batch_row(conn, batch_id)["created_by"] == roles.app


def test_queueing_a_batch_that_is_not_uploading_is_refused(roles: Roles) -> None:
    with _as(roles.app_dsn) as app:
        batch_id = _upload(app, status="queued")

        with pytest.raises(
            psycopg.errors.ObjectNotInPrerequisiteState,
            match="only an uploading batch can be queued",
        ):
            app.execute("SELECT app_queue_batch(%s)", (batch_id,))


def test_definer_functions_ignore_the_callers_own_objects(
    conn: Conn, roles: Roles
) -> None:
    """A temporary table shadowing a project table is not what they change."""
    with _as(roles.app_dsn) as app:
        batch_id = _upload(app, status="queued")
        app.execute(
            "CREATE TEMP TABLE extraction_batches"
            " (id uuid, status text, created_by text, updated_at timestamptz)"
        )
        app.execute(
            "INSERT INTO pg_temp.extraction_batches"
            " VALUES (%s, 'uploading', %s, now())",
            (batch_id, roles.app),
        )

        app.execute("SELECT app_cancel_batch(%s)", (batch_id,))

    assert batch_row(conn, batch_id)["status"] == "cancelled"


def test_every_definer_function_pins_its_search_path(conn: Conn) -> None:
    rows = conn.execute(
        "SELECT p.proname, p.proconfig FROM pg_proc p"
        " JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE p.prosecdef AND n.nspname = current_schema()"
    ).fetchall()
    schema = conn.execute("SELECT current_schema()").fetchone()

    assert {name for name, _ in rows} >= {
        "app_queue_batch",
        "app_cancel_batch",
        "documents_count_inserted",
        "documents_ledger_deleted",
        "user_usage_ledger_adjusted",
    }
    assert schema is not None
    for name, config in rows:
        assert f"search_path={schema[0]}, pg_temp" in (config or []), name


# --- the listener role ---------------------------------------------------------


@pytest.mark.slow
def test_listener_role_processes_checks_and_reports(conn: Conn, roles: Roles) -> None:
    conn.execute("INSERT INTO user_usage (user_id, documents_limit) VALUES ('u1', 10)")
    with _as(roles.app_dsn) as app:
        batch_id = _upload(app, n_docs=4, status="queued")

    swept = run_cli("sweep", dsn=roles.listener_dsn)
    checked = run_cli("check", dsn=roles.listener_dsn)
    status = run_cli("status", "--json", dsn=roles.listener_dsn)

    assert swept.returncode == 0, swept.stderr
    assert "4 documents completed" in swept.stdout
    assert batch_row(conn, batch_id)["status"] == "completed"
    assert usage_of(conn, "u1") == 4
    assert checked.returncode == 0, checked.stderr
    assert status.returncode == 0, status.stderr


def test_listener_role_leases_release_and_recovers(conn: Conn, roles: Roles) -> None:
    batch_id = make_batch(conn, n_docs=3)

    with _as(roles.listener_dsn) as worker:
        rows = worker.execute(
            "SELECT document_id, lease_token FROM claim_batch('lw', 3, 60)"
        ).fetchall()
        ids, tokens = [r[0] for r in rows], [r[1] for r in rows]
        worker.execute("SELECT extend_leases(%s, %s, 60)", (ids, tokens))
        worker.execute("SELECT release_documents(%s, %s, true)", (ids[:1], tokens[:1]))
        worker.execute(
            "SELECT * FROM finish_documents(%s, %s, %s, '[{}]', ARRAY[NULL])",
            (ids[1:2], tokens[1:2], ["completed"]),
        )
        conn.execute(
            "UPDATE documents SET lease_expires_at = now() WHERE id = %s", (ids[2],)
        )
        recovered = worker.execute("SELECT * FROM recover_expired_leases(3)").fetchone()
        worker.execute("SELECT repair_batches(), request_sweep()")
        worker.execute("SELECT * FROM sweep_candidates(10)").fetchall()

    assert recovered == (1, 0)
    assert batch_row(conn, batch_id)["completed_count"] == 1
    assert conn.execute("SELECT * FROM listener_check()").fetchall() == []


@pytest.mark.parametrize(
    "statement",
    [
        "DROP TABLE documents",
        "DROP TABLE extraction_batches CASCADE",
        "DROP TABLE user_usage",
        "DROP FUNCTION claim_batch",
        "DROP TRIGGER documents_count_inserted ON documents",
        "TRUNCATE documents",
        "TRUNCATE extraction_batches CASCADE",
        "TRUNCATE user_usage",
        "TRUNCATE listener_usage_ledger",
        "ALTER TABLE documents DROP CONSTRAINT documents_status_check",
        "DELETE FROM extraction_batches",
        "DELETE FROM user_usage",
        "INSERT INTO extraction_batches (user_id) VALUES ('u1')",
        "UPDATE documents SET content = 'rewritten'",
        "UPDATE documents SET user_id = 'someone else'",
        "UPDATE listener_usage_ledger SET usage_adjusted = 5",
        "SELECT requeue_batch(%(batch)s)",
        "SELECT cancel_batch(%(batch)s)",
        "SELECT app_cancel_batch(%(batch)s)",
        "SELECT listener_create_roles('x', 'y')",
        "CALL listener_prune('0 seconds')",
        "SELECT * FROM listener_prune_chunk(now())",
    ],
)
def test_listener_role_cannot_drop_truncate_or_rewrite(
    conn: Conn, roles: Roles, statement: str
) -> None:
    batch_id = make_batch(conn, n_docs=1)

    with (
        _as(roles.listener_dsn) as worker,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        worker.execute(statement, {"batch": batch_id})

    assert batch_row(conn, batch_id)["total_documents"] == 1


def test_creating_roles_twice_changes_nothing(conn: Conn, roles: Roles) -> None:
    before = conn.execute(
        "SELECT relname, relacl::text FROM pg_class WHERE relname IN"
        " ('documents', 'extraction_batches', 'user_usage') ORDER BY 1"
    ).fetchall()

    conn.execute("SELECT listener_create_roles(%s, %s)", (roles.listener, roles.app))

    after = conn.execute(
        "SELECT relname, relacl::text FROM pg_class WHERE relname IN"
        " ('documents', 'extraction_batches', 'user_usage') ORDER BY 1"
    ).fetchall()
    assert after == before


@pytest.mark.parametrize("names", [(None, "a"), ("same", "same")])
def test_role_names_must_be_two_different_ones(
    conn: Conn, names: tuple[str | None, str]
) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="two different"):
        conn.execute("SELECT listener_create_roles(%s, %s)", names)


def test_role_names_are_quoted_not_spliced(conn: Conn) -> None:
    odd = f'odd "role"; DROP TABLE documents; -- {uuid.uuid4().hex[:6]}'
    other = f"plain_{uuid.uuid4().hex[:8]}"
    try:
        conn.execute("SELECT listener_create_roles(%s, %s)", (odd, other))

        assert conn.execute("SELECT to_regclass('documents')").fetchone() != (None,)
        assert conn.execute(
            "SELECT has_function_privilege(%s, 'claim_batch(text, integer,"
            " double precision, uuid, bigint)', 'EXECUTE')",
            (odd,),
        ).fetchone() == (True,)
    finally:
        _drop_role(conn, odd)
        _drop_role(conn, other)
