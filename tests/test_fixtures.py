"""Check the database fixtures and helpers that every other test relies on."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from helpers import batch_row, make_batch, usage_of

# Databases seen by test_each_test_gets_a_fresh_database, across its runs.
_SEEN_DATABASES: set[str] = set()


@pytest.mark.parametrize("run", ["first", "second"])
def test_each_test_gets_a_fresh_database(
    conn: psycopg.Connection[Any], template_db: str, run: str
) -> None:
    """Each run creates the same table: only possible in a database of its own."""
    row = conn.execute("SELECT current_database()").fetchone()
    assert row is not None
    name = row[0]

    conn.execute("CREATE TABLE fixture_marker (run text)")

    assert name.startswith("listener_t_")
    assert name != template_db
    assert name not in _SEEN_DATABASES
    _SEEN_DATABASES.add(name)


@pytest.mark.parametrize("table", ["extraction_batches", "documents", "user_usage"])
def test_test_database_has_migrated_tables(
    conn: psycopg.Connection[Any], table: str
) -> None:
    row = conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()

    assert row is not None
    assert row[0] is not None


def test_template_takes_no_connections(pg_admin_dsn: str, template_db: str) -> None:
    """A connection to the template would make every later clone fail."""
    row = None
    with psycopg.connect(pg_admin_dsn, autocommit=True) as admin:
        row = admin.execute(
            "SELECT datallowconn FROM pg_database WHERE datname = %s",
            (template_db,),
        ).fetchone()

    assert row == (False,)


def test_make_batch_inserts_documents_counted_by_the_database(
    conn: psycopg.Connection[Any],
) -> None:
    batch_id = make_batch(conn, user_id="u7", n_docs=4)

    names = conn.execute(
        "SELECT file_name FROM documents WHERE batch_id = %s ORDER BY file_name",
        (batch_id,),
    ).fetchall()
    batch = batch_row(conn, batch_id)
    assert [n for (n,) in names] == ["doc-0.txt", "doc-1.txt", "doc-2.txt", "doc-3.txt"]
    assert batch["user_id"] == "u7"
    assert batch["total_documents"] == 4


def test_usage_of_a_user_without_a_row_is_zero(conn: psycopg.Connection[Any]) -> None:
    assert usage_of(conn, "nobody") == 0
