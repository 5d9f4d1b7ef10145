"""Benchmark 2: commit-to-extractor-start latency on an idle listener."""

from __future__ import annotations

import time
from typing import Any

import orjson
import psycopg

from bench.common import Figure, Server, percentile, say
from bench.process import listener_running

BATCHES = 500
# label -> extractor; the async one is the headline, like the no-op of benchmark 1.
EXTRACTORS = {
    "async extractor": "bench.extractors:stamp_async",
    "sync extractor (worker thread)": "bench.extractors:stamp",
}
# Pause between batches, so that each one finds the listener idle.
IDLE_SECONDS = 0.005

# One statement, so the batch and its document commit in one transaction.
_INSERT = """
WITH batch AS (
    INSERT INTO extraction_batches (user_id) VALUES ('bench-latency') RETURNING id
)
INSERT INTO documents (batch_id, user_id, file_name, content)
SELECT batch.id, 'bench-latency', 'one.txt', 'hello'::bytea FROM batch
RETURNING batch_id
"""


def _wait_finished(watch: psycopg.Connection[Any], batch_id: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for note in watch.notifies(timeout=1.0):
            if orjson.loads(note.payload).get("batch_id") == batch_id:
                return
    raise TimeoutError(f"batch {batch_id} did not finish within 30 s")


def measure(dsn: str, batches: int, extractor: str) -> list[float]:
    """Return commit-to-extractor-start latencies in ms, one per batch."""
    committed: dict[str, float] = {}
    with (
        psycopg.connect(dsn, autocommit=True) as conn,
        psycopg.connect(dsn, autocommit=True) as watch,
    ):
        watch.execute("LISTEN batch_finished")
        with listener_running(dsn, extractor):
            for _ in range(batches):
                row = conn.execute(_INSERT, prepare=True).fetchone()
                # Autocommit: the statement has committed when it returns.
                at = time.monotonic()
                assert row is not None
                committed[str(row[0])] = at
                _wait_finished(watch, str(row[0]))
                time.sleep(IDLE_SECONDS)
        started = {
            str(batch_id): float(result["started"])
            for batch_id, result in conn.execute(
                "SELECT batch_id, result FROM documents WHERE status = 'completed'"
            ).fetchall()
        }
    if started.keys() != committed.keys():
        raise RuntimeError(
            f"{len(committed) - len(started)} of {len(committed)} documents "
            "were not completed"
        )
    return [(started[b] - committed[b]) * 1000 for b in committed]


def run(server: Server, runs: int) -> list[Figure]:
    """Measure BATCHES single-document batches per extractor kind, `runs` times."""
    figures: list[Figure] = []
    for label, extractor in EXTRACTORS.items():
        quantiles = {
            q: Figure(f"commit to extractor start, {label}, {q}", "ms", digits=3)
            for q in ("p50", "p95", "p99", "max")
        }
        for number in range(runs):
            dsn = server.create_database("latency")
            try:
                latencies = measure(dsn, BATCHES, extractor)
            finally:
                server.drop_database(dsn)
            for q, fraction in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
                quantiles[q].add(percentile(latencies, fraction))
            quantiles["max"].add(max(latencies))
            say(
                f"  {label}, run {number + 1}: "
                + ", ".join(f"{q} {f.values[-1]:.3f} ms" for q, f in quantiles.items())
            )
        figures += quantiles.values()
    return figures
