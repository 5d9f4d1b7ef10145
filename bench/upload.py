"""Benchmark 4: what the notification triggers cost concurrent uploaders."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from bench.common import Figure, Server, say

UPLOADERS = 4
SINGLE_DOCS = 1000  # per uploader per run, one committed transaction each
BULK_STATEMENTS = 10  # per uploader per run, BULK_SIZE documents each
BULK_SIZE = 1000
CONTENT = b"%PDF-1.7 pretend scanned page " * 34  # about 1 KiB

_SINGLE = (
    "INSERT INTO documents (batch_id, user_id, file_name, content)"
    " VALUES (%s, %s, %s, %s)"
)
_BULK = (
    "INSERT INTO documents (batch_id, user_id, file_name, content)"
    " SELECT %s, %s, f.name, f.content"
    " FROM unnest(%s::text[], %s::bytea[]) AS f (name, content)"
)
_NOTIFY_TRIGGER = "documents_notify_inserted"

# variant -> (label, session setup on the uploaders)
VARIANTS = {
    "on": ("all triggers on", None),
    "notify_off": (f"{_NOTIFY_TRIGGER} disabled", None),
    "replica": ("every trigger off (session_replication_role = replica)", "replica"),
}


class _Drain:
    """A LISTEN batch_work connection that reads every notification, like a listener."""

    def __init__(self, dsn: str) -> None:
        self._conn = psycopg.connect(dsn, autocommit=True)
        self._conn.execute("LISTEN batch_work")
        self._stop = threading.Event()
        self.received = 0
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            for _ in self._conn.notifies(timeout=0.1):
                self.received += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._conn.close()


def _upload(
    dsn: str, mode: str, role: str | None, barrier: threading.Barrier, uploader: int
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        if role:
            conn.execute("SET session_replication_role = replica")
        user = f"bench-uploader-{uploader}"
        row = conn.execute(
            "INSERT INTO extraction_batches (user_id) VALUES (%s) RETURNING id", (user,)
        ).fetchone()
        assert row is not None
        batch_id = row[0]
        names = [f"page-{i}.pdf" for i in range(BULK_SIZE)]
        contents = [CONTENT] * BULK_SIZE
        barrier.wait()
        if mode == "single":
            for i in range(SINGLE_DOCS):
                conn.execute(_SINGLE, (batch_id, user, f"page-{i}.pdf", CONTENT))
        else:
            for _ in range(BULK_STATEMENTS):
                conn.execute(_BULK, (batch_id, user, names, contents))
        barrier.wait()


def measure(dsn: str, mode: str, role: str | None) -> float:
    """Return documents inserted per second by UPLOADERS concurrent uploaders."""
    barrier = threading.Barrier(UPLOADERS + 1)
    errors: list[BaseException] = []

    def target(number: int) -> None:
        try:
            _upload(dsn, mode, role, barrier, number)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=target, args=(n,)) for n in range(UPLOADERS)]
    for thread in threads:
        thread.start()
    barrier.wait()
    began = time.perf_counter()
    barrier.wait()
    spent = time.perf_counter() - began
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    per_uploader = SINGLE_DOCS if mode == "single" else BULK_STATEMENTS * BULK_SIZE
    return UPLOADERS * per_uploader / spent


def _set_notify_trigger(dsn: str, enabled: bool) -> None:
    action = "ENABLE" if enabled else "DISABLE"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE documents {action} TRIGGER {_NOTIFY_TRIGGER}")


def run(server: Server, runs: int) -> list[Figure]:
    """Measure uploads with the notification triggers on and off, paired per run."""
    dsn = server.create_database("upload")
    figures: list[Figure] = []
    drain = _Drain(dsn)
    try:
        for mode, label in (
            ("single", "1 document per transaction"),
            ("bulk", f"{BULK_SIZE:,} documents per statement"),
        ):
            rates = {
                v: Figure(f"{label}, {VARIANTS[v][0]}", "docs/s") for v in VARIANTS
            }
            cost = Figure(
                f"{label}: notify trigger cost (1 - on/off, paired)", "%", digits=1
            )
            cost_all = Figure(
                f"{label}: all triggers' cost (1 - on/replica, paired)", "%", digits=1
            )
            for number in range(runs):
                got: dict[str, float] = {}
                for variant, (_, role) in VARIANTS.items():
                    got[variant] = _with_variant(
                        dsn, variant, functools.partial(measure, dsn, mode, role)
                    )
                    rates[variant].add(got[variant])
                cost.add(100 * (1 - got["on"] / got["notify_off"]))
                cost_all.add(100 * (1 - got["on"] / got["replica"]))
                say(
                    f"  {mode} run {number + 1}: "
                    + ", ".join(f"{v} {got[v]:,.0f}" for v in VARIANTS)
                    + " docs/s"
                )
            figures += [*rates.values(), cost, cost_all]
        say(f"  ({drain.received:,} batch_work notifications read by the LISTEN side)")
    finally:
        drain.close()
        server.drop_database(dsn)
    return figures


def _with_variant(dsn: str, variant: str, measure_once: Callable[[], Any]) -> float:
    if variant != "notify_off":
        return float(measure_once())
    _set_notify_trigger(dsn, enabled=False)
    try:
        return float(measure_once())
    finally:
        _set_notify_trigger(dsn, enabled=True)
