"""Benchmark 4: what the notification triggers cost concurrent uploaders."""

from __future__ import annotations

import threading
import time

import psycopg

from bench.common import Figure, Server, say

UPLOADERS = 4
# Each run alternates the two variants SLOTS times (on, off, off, on, ...), so
# that the load of other work on the machine falls on both alike.
SLOTS = 6
SINGLE_DOCS = 250  # per uploader per slot, one committed transaction each
BULK_STATEMENTS = 3  # per uploader per slot, BULK_SIZE documents each
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

# session_replication_role = replica is no "triggers off" variant: the
# counting triggers fire ALWAYS (sql/008), so it would only drop NOTIFY and
# the foreign-key checks. Disabling the one trigger measures NOTIFY alone.
VARIANTS = {"on": "all triggers on", "off": f"{_NOTIFY_TRIGGER} disabled"}


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


def _upload(dsn: str, mode: str, barrier: threading.Barrier, uploader: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
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


def measure(dsn: str, mode: str) -> tuple[int, float]:
    """Return documents inserted by UPLOADERS concurrent uploaders, and seconds."""
    barrier = threading.Barrier(UPLOADERS + 1)
    errors: list[BaseException] = []

    def target(number: int) -> None:
        try:
            _upload(dsn, mode, barrier, number)
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
    return UPLOADERS * per_uploader, spent


def _set_notify_trigger(dsn: str, enabled: bool) -> None:
    action = "ENABLE" if enabled else "DISABLE"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE documents {action} TRIGGER {_NOTIFY_TRIGGER}")


def measure_run(dsn: str, mode: str) -> dict[str, float]:
    """Return docs/s per variant over SLOTS alternations of the two."""
    docs = dict.fromkeys(VARIANTS, 0)
    seconds = dict.fromkeys(VARIANTS, 0.0)
    for slot in range(SLOTS):
        order = list(VARIANTS) if slot % 2 == 0 else list(reversed(VARIANTS))
        for variant in order:
            _set_notify_trigger(dsn, enabled=variant == "on")
            n, spent = measure(dsn, mode)
            docs[variant] += n
            seconds[variant] += spent
    _set_notify_trigger(dsn, enabled=True)
    return {v: docs[v] / seconds[v] for v in VARIANTS}


def run(server: Server, runs: int) -> list[Figure]:
    """Measure uploads with the notification trigger on and off, paired per run."""
    dsn = server.create_database("upload")
    figures: list[Figure] = []
    drain = _Drain(dsn)
    try:
        for mode, label in (
            ("single", "1 document per transaction"),
            ("bulk", f"{BULK_SIZE:,} documents per statement"),
        ):
            rates = {v: Figure(f"{label}, {VARIANTS[v]}", "docs/s") for v in VARIANTS}
            cost = Figure(
                f"{label}: notify trigger cost (1 - on/off, paired)", "%", digits=1
            )
            for number in range(runs):
                got = measure_run(dsn, mode)
                for variant, rate in got.items():
                    rates[variant].add(rate)
                cost.add(100 * (1 - got["on"] / got["off"]))
                say(
                    f"  {mode} run {number + 1}: on {got['on']:,.0f}, "
                    f"off {got['off']:,.0f} docs/s, cost {cost.values[-1]:.1f} %"
                )
            figures += [*rates.values(), cost]
        say(f"  ({drain.received:,} batch_work notifications read by the LISTEN side)")
    finally:
        drain.close()
        server.drop_database(dsn)
    return figures
