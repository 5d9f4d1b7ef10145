"""`listener demo`: sample batches through a real listener on an embedded server."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from uuid import UUID

import anyio
import anyio.to_thread
import psycopg

from listener.config import ProcessingSettings
from listener.db import connect, connect_sync
from listener.embedded import default_data_dir, start_embedded
from listener.errors import ListenerError
from listener.extractors import Document, text_statistics
from listener.migrate import apply_migrations
from listener.status import format_seconds, progress_bar

log = logging.getLogger(__name__)

TERMINAL = ("completed", "partially_completed", "failed", "cancelled")
# The whole demo takes a few seconds; past this something is wrong.
DEADLINE_SECONDS = 120.0
# Seconds an extraction pretends to wait for a model: enough to watch, not to wait.
MODEL_LATENCY = 0.004
PIPED_PROGRESS_SECONDS = 1.0
QUOTA_USER, QUOTA_LIMIT = "demo-trial-user", 25

DEMO_SETTINGS = ProcessingSettings(
    extractor="listener.demo:demo_extractor",
    concurrency=32,
    lease_seconds=30,
    max_attempts=3,
    retry_delay=0.2,
    extract_timeout=10,
    claim_size=100,
)


@dataclass(frozen=True, slots=True)
class Sample:
    """One sample batch: who uploads it, how many documents, and of what kind."""

    label: str
    user_id: str
    documents: int
    story: str
    binary_every: int = 0
    flaky_every: int = 0
    cancel: bool = False


SAMPLES = (
    Sample(
        "annual-reports",
        "demo-acme",
        2000,
        "2,000 text reports",
        flaky_every=250,
    ),
    Sample("scans-mixed", "demo-globex", 40, "text with 8 binary scans", 5),
    Sample("trial-quota", QUOTA_USER, 40, f"40 documents, quota {QUOTA_LIMIT}"),
    Sample("corrupt-upload", "demo-initech", 10, "10 binary files", binary_every=1),
    Sample(
        "abandoned-upload", "demo-hooli", 30, "cancelled while uploading", cancel=True
    ),
)

# Text documents are reports; every binary_every-th one is a PNG header instead,
# which the built-in extractor refuses as not UTF-8.
_INSERT_SAMPLE = """
WITH batch AS (
    INSERT INTO extraction_batches (user_id, status)
    VALUES (%(user_id)s, %(status)s)
    RETURNING id
)
INSERT INTO documents (batch_id, user_id, file_name, content)
SELECT batch.id, %(user_id)s,
       CASE WHEN %(binary_every)s::integer > 0 AND i %% %(binary_every)s = 0
                THEN format('scan-%%s.png', i)
            WHEN %(flaky_every)s::integer > 0 AND i %% %(flaky_every)s = 0
                THEN format('flaky-%%s.txt', i)
            ELSE format('%%s-%%s.txt', %(label)s::text, i) END,
       CASE WHEN %(binary_every)s::integer > 0 AND i %% %(binary_every)s = 0
                THEN decode('89504e470d0a1a0a' || md5(i::text), 'hex')
            ELSE convert_to(format(
                'Report %%s of %%s for %%s. Revenue grew in region %%s; costs fell '
                'in region %%s. The board approved the plan for quarter %%s.',
                i, %(documents)s::integer, %(user_id)s::text, i %% 7, i %% 5,
                i %% 4 + 1), 'UTF8')
       END
FROM batch, generate_series(1, %(documents)s::integer) AS i
RETURNING batch_id
"""


async def demo_extractor(document: Document) -> dict[str, Any]:
    """Extract like the built-in extractor after a short pretend model call.

    A document named flaky-* fails its first try, as a model timeout would,
    and succeeds on the retry.
    """
    await anyio.sleep(MODEL_LATENCY)
    if document.file_name.startswith("flaky-") and document.attempt == 1:
        raise TimeoutError("simulated model timeout on the first try")
    return text_statistics(document)


def demo_data_dir() -> Path:
    """Return the default data directory of the demo's embedded server."""
    return default_data_dir().parent / "demo-pgdata"


def run_demo(data_dir: Path | None, out: TextIO | None = None) -> int:
    """Run the demo end to end on an embedded server in data_dir; return 0."""
    stream = out or sys.stdout
    data_dir = data_dir or demo_data_dir()
    reused = (data_dir / "PG_VERSION").exists()

    dsn = start_embedded(data_dir)
    apply_migrations(dsn)
    _say(
        stream,
        f"embedded PostgreSQL in {data_dir}" + (" (reused)" if reused else ""),
    )

    started = time.monotonic()
    batches = anyio.run(_demonstrate, dsn, stream)
    elapsed = time.monotonic() - started

    stream.write(summary_table(dsn, batches) + "\n")
    _say(stream, f"all {len(batches)} batches terminal in {format_seconds(elapsed)}")
    _say(stream, f"explore them with psql (the server keeps running): psql '{dsn}'")
    _say(
        stream,
        "  SELECT id, status, completed_count, failed_count FROM extraction_batches;",
    )
    _say(stream, "  SELECT jsonb_pretty(listener_status());")
    _say(stream, f"or: listener status --data-dir {data_dir}")
    return 0


def load_samples(dsn: str) -> dict[UUID, Sample]:
    """Insert the sample batches as an application would; return them by id."""
    batches: dict[UUID, Sample] = {}
    with connect_sync(dsn) as conn:
        # The quota user starts each demo with its allowance unused.
        conn.execute(
            "INSERT INTO user_usage (user_id, documents_processed, documents_limit)"
            " VALUES (%s, 0, %s) ON CONFLICT (user_id) DO UPDATE"
            " SET documents_processed = 0, documents_limit = excluded.documents_limit",
            (QUOTA_USER, QUOTA_LIMIT),
        )
        for sample in SAMPLES:
            batches[_insert_sample(conn, sample)] = sample
    return batches


def _insert_sample(conn: psycopg.Connection[Any], sample: Sample) -> UUID:
    with conn.transaction():
        row = conn.execute(
            _INSERT_SAMPLE,
            {
                "user_id": sample.user_id,
                "status": "uploading" if sample.cancel else "queued",
                "label": sample.label,
                "documents": sample.documents,
                "binary_every": sample.binary_every,
                "flaky_every": sample.flaky_every,
            },
        ).fetchone()
    if row is None:
        raise ListenerError(f"sample batch {sample.label} was not inserted")
    batch_id: UUID = row[0]
    if sample.cancel:
        conn.execute("SELECT cancel_batch(%s)", (batch_id,))
    return batch_id


async def _demonstrate(dsn: str, stream: TextIO) -> dict[UUID, Sample]:
    """Start a listener, load the samples, show progress until all are terminal."""
    from listener.service import Service

    service = Service(
        dsn, demo_extractor, DEMO_SETTINGS, sweep_interval=60, shutdown_grace=5
    )
    with anyio.fail_after(DEADLINE_SECONDS), _quiet_listener():
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(service.run)
            await service.ready.wait()

            # Loaded once the listener listens, so notifications drive the work.
            batches = await anyio.to_thread.run_sync(load_samples, dsn)
            _describe_samples(stream, batches)
            done = anyio.Event()
            tasks.start_soon(_show_progress, dsn, list(batches), stream, done)
            await wait_until_terminal(dsn, list(batches))
            done.set()
            service.request_stop()
    return batches


def _describe_samples(stream: TextIO, batches: dict[UUID, Sample]) -> None:
    _say(stream, f"loaded {len(batches)} sample batches:")
    for sample in batches.values():
        _say(stream, f"  {sample.label:<17} {sample.user_id:<16} {sample.story}")


@contextmanager
def _quiet_listener() -> Iterator[None]:
    """Keep the listener's INFO lines from breaking the progress line, unless DEBUG."""
    package = logging.getLogger("listener")
    before = package.level
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        package.setLevel(logging.WARNING)
    try:
        yield
    finally:
        package.setLevel(before)


async def wait_until_terminal(dsn: str, batch_ids: list[UUID]) -> None:
    """Return once every batch in batch_ids is terminal."""
    conn = await connect(dsn)
    try:
        while True:
            cursor = await conn.execute(
                "SELECT count(*) FROM extraction_batches"
                " WHERE id = ANY (%s) AND status <> ALL (%s)",
                (batch_ids, list(TERMINAL)),
            )
            row = await cursor.fetchone()
            if row is not None and row[0] == 0:
                return
            await anyio.sleep(0.05)
    finally:
        await conn.close()


_PROGRESS = """
SELECT coalesce(sum(completed_count), 0), coalesce(sum(failed_count), 0),
       coalesce(sum(total_documents), 0),
       count(*) FILTER (WHERE status = ANY (%(terminal)s)), count(*)
FROM extraction_batches WHERE id = ANY (%(ids)s)
"""


async def _show_progress(
    dsn: str, batch_ids: list[UUID], stream: TextIO, done: anyio.Event
) -> None:
    """Redraw one progress line on a terminal; print one a second when piped."""
    tty = stream.isatty()
    interval = 0.1 if tty else PIPED_PROGRESS_SECONDS
    started = time.monotonic()
    conn = await connect(dsn)
    try:
        while True:
            finished = done.is_set()
            cursor = await conn.execute(
                _PROGRESS, {"terminal": list(TERMINAL), "ids": batch_ids}
            )
            row = await cursor.fetchone()
            if row is not None:
                completed, failed, total, terminal, count = row
                line = _progress_line(
                    completed,
                    failed,
                    total,
                    terminal,
                    count,
                    time.monotonic() - started,
                    color=tty,
                )
                stream.write(f"\r{line}\x1b[K" if tty else line + "\n")
                stream.flush()
            if finished:
                break
            with anyio.move_on_after(interval):
                await done.wait()
    finally:
        await conn.close()
    if tty:
        stream.write("\n")


def _progress_line(
    completed: int,
    failed: int,
    total: int,
    terminal: int,
    batches: int,
    elapsed: float,
    *,
    color: bool,
) -> str:
    bar = progress_bar(completed, failed, total, color=color)
    return (
        f"processing {bar} {completed + failed}/{total} documents "
        f"({completed} completed, {failed} failed), "
        f"{terminal}/{batches} batches done, {format_seconds(elapsed)}"
    )


_SUMMARY = """
SELECT b.id, b.user_id, b.status, b.total_documents, b.completed_count,
       b.failed_count, d.retried, extract(epoch FROM b.completed_at - b.created_at),
       coalesce(d.common_error, b.error)
FROM extraction_batches b
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE x.attempts > 1) AS retried,
           mode() WITHIN GROUP (ORDER BY x.error)
               FILTER (WHERE x.status = 'failed') AS common_error
    FROM documents x WHERE x.batch_id = b.id
) AS d
WHERE b.id = ANY (%s)
ORDER BY b.created_at, b.id
"""
NOTE_CHARS = 60


def summary_table(dsn: str, batches: dict[UUID, Sample]) -> str:
    """Return a table of every sample batch: status, counts, duration, main error."""
    with connect_sync(dsn) as conn:
        rows = conn.execute(_SUMMARY, (list(batches),)).fetchall()
    header = (
        f"{'batch':<9} {'sample':<17} {'status':<20} {'total':>5} {'completed':>9} "
        f"{'failed':>6} {'retried':>7} {'duration':>8}  most common error"
    )
    lines = ["", header, "-" * len(header)]
    for row in rows:
        batch_id, _, status, total, completed, failed, retried, seconds, error = row
        duration = format_seconds(float(seconds)) if seconds is not None else "-"
        note = error or ""
        if len(note) > NOTE_CHARS:
            note = note[: NOTE_CHARS - 1] + "…"
        line = (
            f"{str(batch_id)[:8]:<9} {batches[batch_id].label:<17} {status:<20} "
            f"{total:>5} {completed:>9} {failed:>6} {retried:>7} {duration:>8}  {note}"
        )
        lines.append(line.rstrip())
    return "\n".join(lines) + "\n"


def _say(stream: TextIO, line: str) -> None:
    stream.write(line + "\n")
    stream.flush()
