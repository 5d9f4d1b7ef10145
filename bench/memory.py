"""Benchmark 5: peak RSS of the listener through a 100,000-document batch."""

from __future__ import annotations

import psycopg

from bench.common import Figure, Server, peak_rss_mib, say
from bench.process import listener_running
from bench.throughput import check_all_completed, queue_and_wait

DOCS = 100_000
EXTRACTOR = "listener.extractors:noop"
# About 1 KiB of content per document: 100 MB in the table.
CONTENT = b"%PDF-1.7 pretend scanned page " * 34


def run(server: Server, runs: int) -> list[Figure]:
    """Process one DOCS-document batch per run and read the listener's VmHWM."""
    peak = Figure("listener peak RSS (VmHWM)", "MiB", digits=1)
    idle = Figure("listener RSS when idle before the batch", "MiB", digits=1)
    for number in range(runs):
        dsn = server.create_database("memory")
        try:
            with (
                psycopg.connect(dsn, autocommit=True) as conn,
                psycopg.connect(dsn, autocommit=True) as watch,
            ):
                conn.execute(
                    "WITH batch AS (INSERT INTO extraction_batches (user_id, status)"
                    " VALUES ('bench-memory', 'uploading') RETURNING id)"
                    " INSERT INTO documents (batch_id, user_id, file_name, content)"
                    " SELECT batch.id, 'bench-memory', format('scan-%%s.pdf', i), %s"
                    " FROM batch, generate_series(1, %s) AS i",
                    (CONTENT, DOCS),
                )
                conn.execute("VACUUM ANALYZE extraction_batches, documents")
                watch.execute("LISTEN batch_finished")
                with listener_running(dsn, EXTRACTOR) as listener:
                    idle.add(peak_rss_mib(listener.pid))
                    spent = queue_and_wait(conn, watch, 600)
                    peak.add(peak_rss_mib(listener.pid))
                check_all_completed(conn, DOCS)
        finally:
            server.drop_database(dsn)
        say(
            f"  run {number + 1}: peak {peak.values[-1]:.1f} MiB "
            f"(idle {idle.values[-1]:.1f} MiB), {DOCS / spent:,.0f} docs/s"
        )
    return [peak, idle]
