"""Prometheus metrics and the health endpoints of `listener run --metrics-port`.

The process's own counters live in METRICS, which the engine and the service
update with one call per event; they cost a lock and an addition, so they
are always kept, served or not. Figures about the whole database (queue
depth, oldest waiting document, notification queue) are read at scrape time
with the cheap `listener_status()` query, at most once per
DATABASE_CACHE_SECONDS, and only while the endpoint is served.

Paths: /metrics (Prometheus text or OpenMetrics, as the scraper asks),
/healthz (liveness: the event loop is turning), /readyz (readiness: the LISTEN
connection is up; 503 when it is down).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import anyio
import psycopg
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from listener.db import APPLICATION_NAME
from listener.errors import ConfigError

if TYPE_CHECKING:
    from listener.claim import Finished
    from listener.sweep import Recovery

log = logging.getLogger(__name__)

DATABASE_CACHE_SECONDS = 2.0
# Liveness fails when the event loop has not turned for this long.
STALL_SECONDS = 30.0
BEAT_SECONDS = 1.0
_DB_TIMEOUT_MS = 5000
_STATUS = "SELECT listener_status(0, 0, 0)"
# Extraction times from a cheap local parse to a slow model call.
_EXTRACTION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
)
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
)


class Metrics:
    """The counters, gauges and histograms of one listener process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        reg = self.registry
        self.documents = Counter(
            "listener_documents",
            "Outcomes recorded by this process: completed, failed, retried "
            "(back to uploaded for another try), stale (lease lost, refused)",
            ["outcome"],
            registry=reg,
        )
        for outcome in ("completed", "failed", "retried", "stale"):
            self.documents.labels(outcome)
        self.extraction_seconds = Histogram(
            "listener_extraction_duration_seconds",
            "Time one extraction try took, by its result: completed, failed "
            "(permanent) or error (may be retried)",
            ["result"],
            buckets=_EXTRACTION_BUCKETS,
            registry=reg,
        )
        self.notification_to_start = Histogram(
            "listener_notification_to_start_seconds",
            "From a batch_work notification to the claim that moved the documents "
            "it announced to processing",
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.claims = Counter(
            "listener_claims",
            "claim_batch calls that returned documents",
            registry=reg,
        )
        self.claimed_documents = Counter(
            "listener_claimed_documents", "Documents claimed", registry=reg
        )
        self.in_flight = Gauge(
            "listener_documents_in_flight",
            "Documents this process holds: claimed and not yet recorded",
            registry=reg,
        )
        self.listen_connected = Gauge(
            "listener_listen_connected",
            "1 while the LISTEN connection is up",
            registry=reg,
        )
        self.reconnects = Counter(
            "listener_reconnects",
            "Times the LISTEN connection was re-established after a loss",
            registry=reg,
        )
        self.sweeps = Counter("listener_sweeps", "Sweeps run", registry=reg)
        self.sweep_recovered = Counter(
            "listener_sweep_recovered_documents",
            "Documents of dead workers found by sweeps: requeued for another try, "
            "or failed out of attempts",
            ["result"],
            registry=reg,
        )
        for result in ("requeued", "failed"):
            self.sweep_recovered.labels(result)
        self.sweep_repaired = Counter(
            "listener_sweep_repaired_batches",
            "Batches a sweep closed because all their documents were terminal",
            registry=reg,
        )
        self._beat: float | None = None

    def record_outcomes(self, finished: Iterable[Finished]) -> None:
        """Count the database's verdicts on one group of recorded outcomes."""
        for item in finished:
            outcome = "retried" if item.kind == "retrying" else item.kind
            self.documents.labels(outcome).inc()

    def observe_extraction(self, seconds: float, result: str) -> None:
        """Record how long one extraction try took and how it ended."""
        self.extraction_seconds.labels(result).observe(seconds)

    def record_claim(self, documents: int, notified_at: float | None = None) -> None:
        """Count one claim; notified_at is the time.monotonic() of the notification."""
        if documents <= 0:
            return
        self.claims.inc()
        self.claimed_documents.inc(documents)
        if notified_at is not None:
            self.notification_to_start.observe(time.monotonic() - notified_at)

    def record_sweep(self, recovery: Recovery) -> None:
        """Count one sweep and what it recovered."""
        self.sweeps.inc()
        self.sweep_recovered.labels("requeued").inc(recovery.requeued)
        self.sweep_recovered.labels("failed").inc(recovery.failed)
        self.sweep_repaired.inc(recovery.repaired)

    def set_listening(self, connected: bool, *, reconnected: bool = False) -> None:
        """Record that the LISTEN connection came up (again) or went down."""
        self.listen_connected.set(1 if connected else 0)
        if connected and reconnected:
            self.reconnects.inc()

    def track_in_flight(self, count: Callable[[], int]) -> None:
        """Read the in-flight gauge from count() at every scrape."""
        self.in_flight.set_function(count)

    @property
    def is_listening(self) -> bool:
        """Return whether the LISTEN connection is up."""
        return bool(_gauge_value(self.listen_connected))

    async def beat_forever(self) -> None:
        """Mark the event loop as turning, every BEAT_SECONDS, until cancelled."""
        while True:
            self._beat = time.monotonic()
            await anyio.sleep(BEAT_SECONDS)

    def is_alive(self) -> bool:
        """Return False only if the event loop was seen turning and then stalled."""
        return self._beat is None or time.monotonic() - self._beat < STALL_SECONDS


def _gauge_value(gauge: Gauge) -> float:
    for metric in gauge.collect():
        for sample in metric.samples:
            return float(sample.value)
    return 0.0


METRICS = Metrics()


class DatabaseCollector(Collector):
    """Collect the database-wide figures at scrape time, from listener_status()."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._cached: tuple[float, list[Metric]] | None = None

    def collect(self) -> Iterator[Metric]:
        """Yield the database figures, or only listener_database_up 0 if unreachable."""
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > DATABASE_CACHE_SECONDS:
                self._cached = (now, self._read())
            yield from self._cached[1]

    def describe(self) -> Sequence[Metric]:
        """Describe nothing, so that registering does not query the database."""
        return []

    def close(self) -> None:
        """Close the scrape connection."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _read(self) -> list[Metric]:
        up = GaugeMetricFamily(
            "listener_database_up",
            "1 if the last scrape could read listener_status() from the database",
        )
        try:
            report = self._query()
        except psycopg.Error as exc:
            log.warning("metrics: cannot read the database status: %s", exc)
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        return [up, *_database_metrics(report)]

    def _query(self) -> dict[str, Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self._dsn,
                autocommit=True,
                connect_timeout=5,
                application_name=f"{APPLICATION_NAME}-metrics",
                options=f"-c statement_timeout={_DB_TIMEOUT_MS}",
            )
        row = self._conn.execute(_STATUS).fetchone()
        if row is None:
            raise psycopg.DataError("listener_status() returned no row")
        report: dict[str, Any] = row[0]
        return report


def _database_metrics(report: dict[str, Any]) -> list[Metric]:
    queue = GaugeMetricFamily(
        "listener_queue_documents",
        "Uploaded documents: due now, waiting out a retry backoff, or in batches "
        "still uploading (whole database)",
        labels=["state"],
    )
    for state in ("due", "retry_wait", "uploading"):
        queue.add_metric([state], float(report["queue"][state]))
    batches = GaugeMetricFamily(
        "listener_batches_open",
        "Batches not yet terminal, by status (whole database)",
        labels=["status"],
    )
    for status, count in sorted(report["batch_counts"].items()):
        batches.add_metric([status], float(count))
    oldest = report["oldest_waiting"]
    leased = report["in_flight"]
    return [
        queue,
        batches,
        GaugeMetricFamily(
            "listener_oldest_waiting_seconds",
            "How long the due document waiting longest has waited for a worker; "
            "0 when none waits",
            value=float(oldest["waiting_seconds"]) if oldest else 0.0,
        ),
        GaugeMetricFamily(
            "listener_leased_documents",
            "Documents processing under a lease, any worker (whole database)",
            value=float(leased["documents"]),
        ),
        GaugeMetricFamily(
            "listener_expired_leases",
            "Processing documents whose lease expired, waiting for a sweep",
            value=float(leased["expired"]),
        ),
        GaugeMetricFamily(
            "listener_notification_queue_usage_ratio",
            "pg_notification_queue_usage(): the fraction of the server's NOTIFY "
            "queue in use; near 1, NOTIFY fails",
            value=float(report["notification_queue_usage"]),
        ),
    ]


class HealthServer:
    """Serve /metrics, /healthz and /readyz over HTTP from a daemon thread."""

    def __init__(
        self,
        metrics: Metrics,
        host: str,
        port: int,
        *,
        ready: Callable[[], bool] | None = None,
        collector: DatabaseCollector | None = None,
    ) -> None:
        self.metrics = metrics
        self._ready = ready or (lambda: metrics.is_listening)
        self._collector = collector
        self._registered = False
        self._server = ThreadingHTTPServer((host, port), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="listener-metrics",
            daemon=True,
        )

    @property
    def port(self) -> int:
        """Return the port served on (the chosen one when asked for port 0)."""
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        """Start serving; return self."""
        if self._collector is not None:
            self.metrics.registry.register(self._collector)
            self._registered = True
        self._thread.start()
        log.info("metrics and health checks on port %d", self.port)
        return self

    def close(self) -> None:
        """Stop serving, release the port and the scrape connection."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
        if self._collector is not None:
            if self._registered:
                self.metrics.registry.unregister(self._collector)
                self._registered = False
            self._collector.close()

    def respond(self, path: str, accept: str) -> tuple[int, str, bytes]:
        """Return the status, content type and body for a GET of path."""
        route = path.split("?", 1)[0]
        if route == "/metrics":
            encode, content_type = choose_encoder(accept)
            return 200, content_type, encode(self.metrics.registry)
        if route == "/healthz":
            if self.metrics.is_alive():
                return 200, "text/plain", b"ok\n"
            return 503, "text/plain", b"event loop stalled\n"
        if route == "/readyz":
            if self._ready():
                return 200, "text/plain", b"ready\n"
            return 503, "text/plain", b"LISTEN connection down\n"
        return 404, "text/plain", b"not found: try /metrics, /healthz or /readyz\n"


def _handler_for(server: HealthServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            try:
                status, content_type, body = server.respond(
                    self.path, self.headers.get("Accept", "")
                )
            except Exception:
                log.exception("metrics endpoint failed on %s", self.path)
                status, content_type, body = 500, "text/plain", b"internal error\n"
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("metrics endpoint: " + format, *args)

    return Handler


def serve_metrics(
    dsn: str,
    port: int,
    host: str = "0.0.0.0",
    *,
    ready: Callable[[], bool] | None = None,
    metrics: Metrics = METRICS,
) -> HealthServer:
    """Start the HTTP endpoint, the database figures included; close() it at exit.

    :raises ConfigError: the port cannot be bound.
    """
    collector = DatabaseCollector(dsn)
    try:
        server = HealthServer(metrics, host, port, ready=ready, collector=collector)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
        ) from exc
    return server.start()
