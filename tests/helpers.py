"""Arrange data and run the command line in tests: `from helpers import ...`."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

# One statement, so the batch and its documents commit together and the
# counting trigger sees them all at once. Counters are the database's own.
_INSERT_BATCH = """
WITH batch AS (
    INSERT INTO extraction_batches (user_id, status, created_at)
    VALUES (%(user_id)s, %(status)s, coalesce(%(created_at)s::timestamptz, now()))
    RETURNING id
), docs AS (
    INSERT INTO documents (batch_id, user_id, file_name, content)
    SELECT batch.id, %(user_id)s, format('doc-%%s.txt', i), %(content)s::bytea
    FROM batch, generate_series(0, %(n_docs)s - 1) AS i
)
SELECT id FROM batch
"""


def make_batch(
    conn: psycopg.Connection[Any],
    user_id: str = "u1",
    n_docs: int = 3,
    status: str = "queued",
    content: bytes | None = b"hello world",
    created_at: datetime | None = None,
) -> uuid.UUID:
    """Insert a batch with `n_docs` documents `doc-0.txt`...; return its id.

    Commits, whether or not `conn` is in autocommit mode.
    """
    params = {
        "user_id": user_id,
        "status": status,
        "created_at": created_at,
        "content": content,
        "n_docs": n_docs,
    }
    with conn.transaction():
        row = conn.execute(_INSERT_BATCH, params).fetchone()
    assert row is not None
    batch_id = row[0]
    assert isinstance(batch_id, uuid.UUID)
    return batch_id


def batch_row(conn: psycopg.Connection[Any], batch_id: uuid.UUID) -> dict[str, Any]:
    """Return the batch's row as a dict.

    :raises LookupError: if there is no such batch.
    """
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            "SELECT * FROM extraction_batches WHERE id = %s", (batch_id,)
        ).fetchone()
    if row is None:
        raise LookupError(f"no batch {batch_id}")
    return row


def usage_of(conn: psycopg.Connection[Any], user_id: str) -> int:
    """Return the documents charged to a user: 0 when the user has no row."""
    row = conn.execute(
        "SELECT documents_processed FROM user_usage WHERE user_id = %s", (user_id,)
    ).fetchone()
    return 0 if row is None else int(row[0])


def run_cli(
    *args: str,
    dsn: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m listener *args` to completion and capture its output.

    The child inherits this environment without DATABASE_URL, so it never
    reaches a developer's own database; `dsn`, if given, becomes its
    DATABASE_URL, and `env` overrides anything.

    :raises subprocess.TimeoutExpired: after `timeout` seconds.
    """
    child_env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    if dsn is not None:
        child_env["DATABASE_URL"] = dsn
    child_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "listener", *args],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# Where the test extractors live, for `--extractor extractors_for_tests:NAME`.
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def extractor_env(record_path: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Return the env for run_cli that makes `extractors_for_tests` importable.

    With `record_path`, the recording test extractors append their calls to it.
    """
    env = {
        "PYTHONPATH": os.pathsep.join(
            filter(None, [TESTS_DIR, os.environ.get("PYTHONPATH")])
        )
    }
    if record_path is not None:
        env["LISTENER_TEST_RECORD"] = str(record_path)
    return env


def recorded_calls(record_path: str | os.PathLike[str]) -> list[tuple[str, int]]:
    """Return the (document id, attempt) calls a recording extractor appended."""
    if not os.path.exists(record_path):
        return []
    with open(record_path, encoding="utf-8") as lines:
        return [(doc, int(attempt)) for doc, attempt in map(str.split, lines)]


def add_document(
    conn: psycopg.Connection[Any],
    batch_id: uuid.UUID,
    content: bytes | None = b"hello world",
    file_name: str = "extra.bin",
) -> uuid.UUID:
    """Insert one more document into a batch, as its batch's user; return its id."""
    row = conn.execute(
        "INSERT INTO documents (batch_id, user_id, file_name, content)"
        " SELECT id, user_id, %s, %s FROM extraction_batches WHERE id = %s"
        " RETURNING id",
        (file_name, content, batch_id),
    ).fetchone()
    assert row is not None
    document_id = row[0]
    assert isinstance(document_id, uuid.UUID)
    return document_id


def claim(
    conn: psycopg.Connection[Any],
    worker: str = "w1",
    max_docs: int = 100,
    lease_seconds: float = 60,
    batch_id: uuid.UUID | None = None,
) -> list[dict[str, Any]]:
    """Call claim_batch and return its rows as dicts."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT * FROM claim_batch(%s, %s, %s, %s)",
            (worker, max_docs, lease_seconds, batch_id),
        ).fetchall()


def finish(
    conn: psycopg.Connection[Any],
    claimed: list[dict[str, Any]],
    outcome: str = "completed",
    *,
    result: object = None,
    error: str | None = None,
    max_attempts: int = 3,
    retry_delay: float = 0,
    retry_cap: float = 300,
) -> list[dict[str, Any]]:
    """Call finish_documents with one outcome for every claimed row."""
    results = [result if result is not None else {"ok": True}] * len(claimed)
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT * FROM finish_documents(%s, %s, %s, %s, %s, %s, %s, %s)",
            (
                [c["document_id"] for c in claimed],
                [c["lease_token"] for c in claimed],
                [outcome] * len(claimed),
                Jsonb(results),
                [error] * len(claimed),
                max_attempts,
                retry_delay,
                retry_cap,
            ),
        ).fetchall()
