"""Claiming, completing and failing documents: thin calls of the stored functions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import psycopg

from listener.config import ProcessingSettings
from listener.extractors import Document, Outcome

FinishKind = Literal["completed", "failed", "retrying", "stale"]

_CLAIM = (
    "SELECT lease_token, lease_expires_at, document_id, batch_id, user_id, file_name,"
    " content, storage_url, attempt FROM claim_batch(%s, %s, %s, %s, %s)"
)
_FINISH = (
    "SELECT document_id, outcome, available_at"
    " FROM finish_documents(%s, %s, %s, %s::jsonb, %s, %s, %s, %s)"
)


@dataclass(frozen=True, slots=True)
class Claim:
    """A document this worker holds, with the lease token that fences it."""

    document: Document
    lease_token: UUID
    lease_expires_at: datetime


@dataclass(frozen=True, slots=True)
class Finished:
    """What the database made of one outcome."""

    document_id: UUID
    kind: FinishKind
    due_at: datetime | None


AnyConnection = psycopg.AsyncConnection[Any]


async def claim_batch(
    conn: AnyConnection,
    worker: str,
    max_docs: int,
    lease_seconds: float,
    batch_id: UUID | None = None,
    max_content_bytes: int | None = None,
) -> list[Claim]:
    """Claim up to `max_docs` due documents of one batch (any batch if None).

    Documents with more than `max_content_bytes` of content fail instead,
    their content unread.
    """
    cursor = await conn.execute(
        _CLAIM,
        (worker, max_docs, lease_seconds, batch_id, max_content_bytes),
        prepare=True,
    )
    rows = await cursor.fetchall()
    return [
        Claim(
            document=Document(
                id=row[2],
                batch_id=row[3],
                user_id=row[4],
                file_name=row[5],
                content=row[6],
                storage_url=row[7],
                attempt=row[8],
            ),
            lease_token=row[0],
            lease_expires_at=row[1],
        )
        for row in rows
    ]


async def finish_documents(
    conn: AnyConnection,
    done: Sequence[tuple[Claim, Outcome]],
    settings: ProcessingSettings,
) -> list[Finished]:
    """Record many outcomes in one round trip and one transaction."""
    if not done:
        return []
    results = b"[" + b",".join(o.result_json or b"null" for _, o in done) + b"]"
    cursor = await conn.execute(
        _FINISH,
        (
            [c.document.id for c, _ in done],
            [c.lease_token for c, _ in done],
            [o.kind for _, o in done],
            results.decode(),
            [o.error for _, o in done],
            settings.max_attempts,
            settings.retry_delay,
            settings.retry_cap,
        ),
        prepare=True,
    )
    return [Finished(row[0], row[1], row[2]) for row in await cursor.fetchall()]


async def extend_leases(
    conn: AnyConnection, claims: Sequence[Claim], lease_seconds: float
) -> set[UUID]:
    """Extend the leases still held; return the ids whose lease was extended."""
    if not claims:
        return set()
    cursor = await conn.execute(
        "SELECT extend_leases(%s, %s, %s)",
        (
            [c.document.id for c in claims],
            [c.lease_token for c in claims],
            lease_seconds,
        ),
    )
    return {row[0] for row in await cursor.fetchall()}


async def release_documents(
    conn: AnyConnection,
    claims: Sequence[Claim],
    *,
    unstarted: bool,
    max_attempts: int | None = None,
) -> int:
    """Hand claimed documents back to uploaded at once; return how many were.

    Started documents that have had max_attempts tries fail instead.
    """
    if not claims:
        return 0
    cursor = await conn.execute(
        "SELECT release_documents(%s, %s, %s, %s)",
        (
            [c.document.id for c in claims],
            [c.lease_token for c in claims],
            unstarted,
            max_attempts,
        ),
    )
    row = await cursor.fetchone()
    return int(row[0]) if row else 0
