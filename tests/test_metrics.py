"""The metrics endpoint in this process: /metrics, /healthz, /readyz."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from helpers import batch_row, make_batch
from processes import ListenerProcess
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from psycopg.conninfo import make_conninfo

from listener.claim import Finished
from listener.errors import ConfigError
from listener.metrics import HealthServer, Metrics, serve_metrics
from listener.sweep import Recovery


def get(url: str, accept: str = "") -> tuple[int, str, str]:
    """Return the status, content type and body of a GET."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return (
                response.status,
                response.headers["Content-Type"],
                response.read().decode(),
            )
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Return every sample of a Prometheus text page by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def endpoint(dsn: str, metrics: Metrics) -> Iterator[HealthServer]:
    server = serve_metrics(dsn, 0, "127.0.0.1", metrics=metrics)
    yield server
    server.close()


def url(server: HealthServer, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


def test_metrics_include_the_database_figures(
    conn: psycopg.Connection[Any], endpoint: HealthServer
) -> None:
    make_batch(conn, n_docs=3)
    make_batch(conn, n_docs=2, status="uploading")

    status, content_type, body = get(url(endpoint, "/metrics"))

    assert status == 200
    assert content_type.startswith("text/plain")
    found = samples(body)
    assert found[("listener_database_up", ())] == 1
    assert found[("listener_queue_documents", (("state", "due"),))] == 3
    assert found[("listener_queue_documents", (("state", "uploading"),))] == 2
    assert found[("listener_batches_open", (("status", "queued"),))] == 1
    assert found[("listener_batches_open", (("status", "uploading"),))] == 1
    assert found[("listener_oldest_waiting_seconds", ())] >= 0
    assert found[("listener_notification_queue_usage_ratio", ())] == 0
    assert ("process_cpu_seconds_total", ()) in found


def test_metrics_count_what_the_process_reports(
    endpoint: HealthServer, metrics: Metrics
) -> None:
    metrics.record_outcomes(
        [
            Finished(uuid.uuid4(), "completed", None),
            Finished(uuid.uuid4(), "completed", None),
            Finished(uuid.uuid4(), "retrying", None),
            Finished(uuid.uuid4(), "stale", None),
        ]
    )
    metrics.observe_extraction(0.02, "completed")
    metrics.record_claim(7)
    metrics.record_claim(0)
    metrics.record_sweep(Recovery(requeued=2, failed=1, repaired=1))
    metrics.set_listening(True)
    metrics.set_listening(False)
    metrics.set_listening(True, reconnected=True)
    metrics.track_in_flight(lambda: 5)

    found = samples(get(url(endpoint, "/metrics"))[2])

    assert found[("listener_documents_total", (("outcome", "completed"),))] == 2
    assert found[("listener_documents_total", (("outcome", "retried"),))] == 1
    assert found[("listener_documents_total", (("outcome", "stale"),))] == 1
    assert found[("listener_documents_total", (("outcome", "failed"),))] == 0
    assert (
        found[
            ("listener_extraction_duration_seconds_count", (("result", "completed"),))
        ]
        == 1
    )
    assert found[("listener_claims_total", ())] == 1
    assert found[("listener_claimed_documents_total", ())] == 7
    assert found[("listener_sweeps_total", ())] == 1
    assert (
        found[("listener_sweep_recovered_documents_total", (("result", "failed"),))]
        == 1
    )
    assert found[("listener_sweep_repaired_batches_total", ())] == 1
    assert found[("listener_reconnects_total", ())] == 1
    assert found[("listener_listen_connected", ())] == 1
    assert found[("listener_documents_in_flight", ())] == 5


def test_metrics_speak_openmetrics_when_asked(endpoint: HealthServer) -> None:
    status, content_type, body = get(
        url(endpoint, "/metrics"), accept="application/openmetrics-text; version=1.0.0"
    )

    assert status == 200
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith("# EOF")


def test_readyz_follows_the_listen_connection(
    endpoint: HealthServer, metrics: Metrics
) -> None:
    before = get(url(endpoint, "/readyz"))
    metrics.set_listening(True)
    up = get(url(endpoint, "/readyz"))
    metrics.set_listening(False)
    down = get(url(endpoint, "/readyz"))

    assert before[0] == 503
    assert up[0] == 200
    assert down == (503, "text/plain", "LISTEN connection down\n")


def test_healthz_is_ok_while_the_process_serves(endpoint: HealthServer) -> None:
    assert get(url(endpoint, "/healthz"))[0] == 200
    assert get(url(endpoint, "/nothing-here"))[0] == 404


def test_an_unreachable_database_is_a_metric_not_an_error(
    pg_admin_dsn: str, metrics: Metrics
) -> None:
    missing = make_conninfo(pg_admin_dsn, dbname=f"missing_{uuid.uuid4().hex[:8]}")
    server = serve_metrics(missing, 0, "127.0.0.1", metrics=metrics)
    try:
        status, _, body = get(url(server, "/metrics"))
    finally:
        server.close()

    assert status == 200
    found = samples(body)
    assert found[("listener_database_up", ())] == 0
    assert ("listener_queue_documents", (("state", "due"),)) not in found
    assert ("listener_documents_total", (("outcome", "completed"),)) in found


def test_a_port_in_use_is_a_clear_error(dsn: str, metrics: Metrics) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        with pytest.raises(
            ConfigError, match=f"cannot serve metrics on 127.0.0.1:{port}"
        ):
            serve_metrics(dsn, port, "127.0.0.1", metrics=metrics)


# A real `listener run --metrics-port` process.


class RunningListener(ListenerProcess):
    """A `python -m listener run --metrics-port 0` child; its log is collected."""

    def __init__(self, dsn: str) -> None:
        super().__init__(
            dsn,
            "--metrics-port",
            "0",
            "--metrics-host",
            "127.0.0.1",
            extractor="listener.extractors:noop",
        )
        try:
            port_line = self.wait_for_line(r"metrics and health checks on port (\d+)")
        except BaseException:
            self.kill()
            raise
        self.port = int(port_line.group(1))

    def get(self, path: str) -> tuple[int, str, str]:
        return get(f"http://127.0.0.1:{self.port}{path}")


def poll(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Return once condition() holds; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


@pytest.fixture
def listener_run(dsn: str) -> Iterator[RunningListener]:
    child = RunningListener(dsn)
    yield child
    child.stop()


def _set_connections(admin_dsn: str, name: str, allowed: bool) -> None:
    # A database cannot refuse connections from a session of its own.
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(
            sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
                sql.Identifier(name), sql.Literal(allowed)
            )
        )


@pytest.mark.slow
def test_listener_run_serves_metrics_of_the_work_it_does(
    conn: psycopg.Connection[Any], listener_run: RunningListener
) -> None:
    poll(lambda: listener_run.get("/readyz")[0] == 200, "/readyz answers 200")
    batch = make_batch(conn, n_docs=5)
    poll(lambda: batch_row(conn, batch)["status"] == "completed", "the batch completes")

    def scraped() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return samples(listener_run.get("/metrics")[2])

    # Outcomes are counted right after they commit; give the flush a moment.
    poll(
        lambda: (
            scraped()[("listener_documents_total", (("outcome", "completed"),))] == 5
        ),
        "five completions are counted",
    )
    found = scraped()
    assert found[("listener_claimed_documents_total", ())] == 5
    assert found[("listener_claims_total", ())] >= 1
    assert found[("listener_notification_to_start_seconds_count", ())] >= 1
    assert (
        found[
            ("listener_extraction_duration_seconds_count", (("result", "completed"),))
        ]
        == 5
    )
    assert found[("listener_sweeps_total", ())] >= 1
    assert found[("listener_listen_connected", ())] == 1
    assert found[("listener_documents_in_flight", ())] == 0
    assert found[("listener_queue_documents", (("state", "due"),))] == 0
    assert found[("listener_database_up", ())] == 1
    assert listener_run.get("/healthz")[0] == 200
    assert listener_run.stop() == 0


@pytest.mark.slow
def test_readyz_fails_while_the_listen_connection_is_down(
    conn: psycopg.Connection[Any], pg_admin_dsn: str, listener_run: RunningListener
) -> None:
    poll(lambda: listener_run.get("/readyz")[0] == 200, "/readyz answers 200")
    name = conn.info.dbname

    # Refuse new connections, then cut the LISTEN one: it cannot come back.
    _set_connections(pg_admin_dsn, name, False)
    try:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = %s",
            ("listener-listen",),
        )
        poll(lambda: listener_run.get("/readyz")[0] == 503, "/readyz answers 503")
        down = listener_run.get("/readyz")
        alive = listener_run.get("/healthz")[0]
    finally:
        _set_connections(pg_admin_dsn, name, True)
    poll(lambda: listener_run.get("/readyz")[0] == 200, "/readyz recovers")

    assert down[2] == "LISTEN connection down\n"
    assert alive == 200
    found = samples(listener_run.get("/metrics")[2])
    assert found[("listener_reconnects_total", ())] >= 1
    assert found[("listener_listen_connected", ())] == 1
