"""The `listener` command line: arguments, logging setup, exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import anyio
import orjson
import psycopg
import psycopg.errors

from listener import config
from listener.config import ProcessingSettings, validate_dsn, worker_name
from listener.embedded import default_data_dir, start_embedded
from listener.errors import ConfigError, ListenerError
from listener.extractors import load_extractor

log = logging.getLogger("listener.cli")

# Keys of LogRecord itself; everything else on a record came in through extra=.
_RECORD_KEYS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a whole number, not {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds, not {text!r}"
        ) from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds >= 0, not {text}"
        )
    return value


def _interval(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {text}")
    return value


def _duration(text: str) -> timedelta:
    from listener.prune import parse_duration

    try:
        return parse_duration(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port 0-65535, not {value}")
    return value


def _common_options() -> _Parser:
    common = _Parser(add_help=False)
    group = common.add_argument_group("connection and logging")
    group.add_argument(
        "--dsn",
        help="PostgreSQL connection string "
        "(default: $DATABASE_URL, else the embedded server)",
    )
    group.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"data directory of the embedded server (default: {default_data_dir()})",
    )
    group.add_argument(
        "--log-level",
        default=os.environ.get("LISTENER_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="least severe level logged (default: INFO, or $LISTENER_LOG_LEVEL)",
    )
    group.add_argument(
        "--log-format",
        default=os.environ.get("LISTENER_LOG_FORMAT", "text"),
        choices=["text", "json"],
        help="text lines for people, or one JSON object per line (default: text)",
    )
    return common


def _processing_options() -> _Parser:
    defaults = ProcessingSettings()
    processing = _Parser(add_help=False)
    group = processing.add_argument_group("processing")
    group.add_argument(
        "--extractor",
        default=defaults.extractor,
        metavar="MODULE:FUNCTION",
        help=f"callable that extracts one document (default: {defaults.extractor})",
    )
    group.add_argument(
        "--concurrency",
        type=_positive_int,
        default=defaults.concurrency,
        help=f"documents extracted at once (default: {defaults.concurrency})",
    )
    group.add_argument(
        "--lease-seconds",
        type=_seconds,
        default=defaults.lease_seconds,
        help="how long a claim lasts without a heartbeat; a dead worker's documents "
        f"come back after it (default: {defaults.lease_seconds:g})",
    )
    group.add_argument(
        "--max-attempts",
        type=_positive_int,
        default=defaults.max_attempts,
        help=f"tries per document before it fails (default: {defaults.max_attempts})",
    )
    group.add_argument(
        "--retry-delay",
        type=_seconds,
        default=defaults.retry_delay,
        help="base of the exponential backoff between tries, in seconds "
        f"(default: {defaults.retry_delay:g}, capped at {defaults.retry_cap:g})",
    )
    group.add_argument(
        "--extract-timeout",
        type=_seconds,
        default=defaults.extract_timeout,
        help=f"seconds one extraction may take (default: {defaults.extract_timeout:g})",
    )
    group.add_argument(
        "--claim-size",
        type=_positive_int,
        default=defaults.claim_size,
        help=f"most documents of one batch per claim (default: {defaults.claim_size})",
    )
    group.add_argument(
        "--max-content-bytes",
        type=_positive_int,
        default=defaults.max_content_bytes,
        metavar="BYTES",
        help="fail documents with more content than this, without loading it "
        "(default: no limit)",
    )
    return processing


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the whole command line."""
    common, processing = _common_options(), _processing_options()
    parser = _Parser(
        prog="listener",
        description="Event-driven PostgreSQL document-batch processor.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")

    verbs.add_parser(
        "migrate", parents=[common], help="apply the SQL migrations (idempotent)"
    )

    sweep = verbs.add_parser(
        "sweep",
        parents=[common, processing],
        help="one cron-style pass: recover dead workers' documents, "
        "process some batches",
    )
    sweep.add_argument(
        "--max-batches-per-run",
        type=_positive_int,
        default=10,
        help="batches served per run, oldest created_at first (default: 10)",
    )
    sweep.add_argument(
        "--max-docs-per-batch-run",
        type=_positive_int,
        default=100,
        help="documents processed per batch per run (default: 100)",
    )

    run = verbs.add_parser(
        "run", parents=[common, processing], help="the always-on listener"
    )
    run.add_argument(
        "--sweep-interval",
        type=_seconds,
        default=60.0,
        help="seconds between periodic sweeps (default: 60)",
    )
    run.add_argument(
        "--shutdown-grace",
        type=_seconds,
        default=30.0,
        help="seconds documents in flight may take to finish after SIGTERM "
        "(default: 30)",
    )
    run.add_argument(
        "--metrics-port",
        type=_port,
        # argparse converts a string default with type=, and reports it alike.
        default=os.environ.get("LISTENER_METRICS_PORT") or None,
        metavar="PORT",
        help="serve Prometheus /metrics, /healthz and /readyz on PORT "
        "(default: $LISTENER_METRICS_PORT, else no endpoint; 0 picks a free port)",
    )
    run.add_argument(
        "--metrics-host",
        default=os.environ.get("LISTENER_METRICS_HOST", "0.0.0.0"),
        metavar="ADDRESS",
        help="address the metrics endpoint binds (default: $LISTENER_METRICS_HOST, "
        "else 0.0.0.0)",
    )

    status = verbs.add_parser(
        "status",
        parents=[common],
        help="batches in flight, queue depth, oldest waiting",
    )
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument(
        "--watch",
        type=_interval,
        nargs="?",
        const=2.0,
        default=None,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until interrupted; in place on a "
        "terminal, one report after another when piped",
    )

    check = verbs.add_parser(
        "check",
        parents=[common],
        help="report every violation of the invariants; exit 1 if there is one",
    )
    check.add_argument(
        "--max-attempts",
        type=_positive_int,
        default=ProcessingSettings().max_attempts,
        help="attempts a document may have started (default: %(default)s)",
    )
    check.add_argument(
        "--lease-grace",
        type=_seconds,
        default=120.0,
        metavar="SECONDS",
        help="how long past its expiry a lease may wait for a sweep (default: 120)",
    )
    check.add_argument(
        "--ignore-usage-excess",
        action="store_true",
        help="do not report usage above the completed documents (usage raised by hand)",
    )

    prune = verbs.add_parser(
        "prune",
        parents=[common],
        help="delete finished batches and their documents older than a duration",
    )
    prune.add_argument(
        "--older-than",
        required=True,
        type=_duration,
        metavar="DURATION",
        help="age of completed_at past which a finished batch goes: 30d, 12h, 90m",
    )
    prune.add_argument(
        "--chunk-batches",
        type=_positive_int,
        default=1000,
        help="batches deleted per transaction (default: 1000)",
    )

    verbs.add_parser(
        "demo",
        parents=[common],
        help="start an embedded server, load sample batches, process them, "
        "show results",
    )
    return parser


def verb_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Return the parser of each verb of the command line, by name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


class _JsonFormatter(logging.Formatter):
    """Format each record as one JSON object with stable keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(
            (key, value)
            for key, value in vars(record).items()
            if key not in _RECORD_KEYS
        )
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str, log_format: str) -> None:
    """Send log records to stderr, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # psycopg's pool logs every failed reconnect attempt; our own lines say enough.
    logging.getLogger("psycopg.pool").setLevel(
        max(logging.getLevelName(level), logging.ERROR)
    )
    # pgserver narrates every pg_ctl call at INFO; only its problems matter here.
    logging.getLogger("pgserver").setLevel(
        max(logging.getLevelName(level), logging.WARNING)
    )


def resolve_dsn(args: argparse.Namespace) -> str:
    """Return --dsn, else $DATABASE_URL, else the DSN of the embedded server.

    The embedded server is started and migrated on first use.
    """
    dsn = args.dsn or os.environ.get("DATABASE_URL")
    if dsn:
        return validate_dsn(dsn)
    from listener.migrate import apply_migrations

    dsn = start_embedded(args.data_dir or default_data_dir())
    apply_migrations(dsn)
    print(f"embedded PostgreSQL: psql '{dsn}'", file=sys.stderr)
    return dsn


def processing_settings(args: argparse.Namespace) -> ProcessingSettings:
    """Return the processing settings given on the command line."""
    return ProcessingSettings(
        extractor=args.extractor,
        concurrency=args.concurrency,
        lease_seconds=args.lease_seconds,
        max_attempts=args.max_attempts,
        retry_delay=args.retry_delay,
        extract_timeout=args.extract_timeout,
        claim_size=args.claim_size,
        max_content_bytes=args.max_content_bytes,
    )


def _migrate(args: argparse.Namespace) -> int:
    from listener.migrate import apply_migrations

    dsn = resolve_dsn(args)
    applied = apply_migrations(dsn)
    if applied:
        print(f"migrate: applied {', '.join(applied)} on {config.describe_dsn(dsn)}")
    else:
        print(f"migrate: {config.describe_dsn(dsn)} is up to date")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from listener.sweep import sweep_once

    settings = processing_settings(args)
    extractor = load_extractor(settings.extractor)
    dsn = resolve_dsn(args)
    summary = anyio.run(
        lambda: sweep_once(
            dsn,
            extractor,
            settings,
            worker_name(),
            max_batches=args.max_batches_per_run,
            max_docs_per_batch=args.max_docs_per_batch_run,
        )
    )
    print(summary.describe())
    return 0


def _run(args: argparse.Namespace) -> int:
    from listener.service import run_listener

    settings = processing_settings(args)
    extractor = load_extractor(settings.extractor)
    dsn = resolve_dsn(args)
    endpoint = None
    if args.metrics_port is not None:
        from listener.metrics import serve_metrics

        endpoint = serve_metrics(dsn, args.metrics_port, args.metrics_host)
    try:
        code: int = run_listener(
            dsn,
            extractor,
            settings,
            sweep_interval=args.sweep_interval,
            shutdown_grace=args.shutdown_grace,
        )
    finally:
        if endpoint is not None:
            endpoint.close()
    return code


def _status(args: argparse.Namespace) -> int:
    from listener.status import print_status

    watch = False if args.watch is None else args.watch
    code: int = print_status(resolve_dsn(args), as_json=args.json, watch=watch)
    return code


def _check(args: argparse.Namespace) -> int:
    from listener.check import find_violations

    findings = find_violations(
        resolve_dsn(args),
        max_attempts=args.max_attempts,
        lease_grace=args.lease_grace,
        report_usage_excess=not args.ignore_usage_excess,
    )
    for finding in findings:
        print(finding.describe())
    if findings:
        print(f"check: {len(findings)} violations", file=sys.stderr)
        return 1
    print("check: clean")
    return 0


def _prune(args: argparse.Namespace) -> int:
    from listener.prune import prune_finished

    summary = prune_finished(
        resolve_dsn(args), args.older_than, chunk_batches=args.chunk_batches
    )
    print(summary.describe())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from listener.demo import run_demo

    if args.dsn:
        raise ConfigError(
            "listener demo runs on its own embedded server, not on --dsn; "
            "choose its data directory with --data-dir"
        )
    code: int = run_demo(args.data_dir)
    return code


_VERBS = {
    "migrate": _migrate,
    "sweep": _sweep,
    "run": _run,
    "status": _status,
    "check": _check,
    "prune": _prune,
    "demo": _demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        code = _VERBS[args.verb](args)
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:
        code = _fail(_explain(_innermost(exc)))
    _exit_despite_abandoned_threads(code)
    return code


def _exit_despite_abandoned_threads(code: int) -> None:
    """Exit now if a sync extractor that overran its timeout still runs.

    Python cannot stop a thread, and it waits for every non-daemon thread at
    exit, so one extractor that never returns would hold a cron sweep (or a
    stopping listener) forever. Its document was already recorded as timed out.
    """
    stuck = [
        thread
        for thread in threading.enumerate()
        if thread is not threading.main_thread()
        and thread.is_alive()
        and not thread.daemon
    ]
    if not stuck:
        return
    log.warning(
        "exiting although %d extractor threads still run (past --extract-timeout "
        "or --shutdown-grace); their documents are recorded or handed back",
        len(stuck),
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _innermost(exc: BaseException) -> BaseException:
    """Return the first real error inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _explain(exc: BaseException) -> str:
    """Return one line for a person; unexpected errors keep their type name."""
    if isinstance(exc, ListenerError):
        return str(exc)
    if isinstance(
        exc, psycopg.errors.UndefinedFunction | psycopg.errors.UndefinedTable
    ):
        return (
            "the database is not migrated, run `listener migrate` first "
            f"({exc.diag.message_primary})"
        )
    if isinstance(exc, psycopg.OperationalError):
        first = (
            str(exc).strip().splitlines()[0] if str(exc).strip() else "connection lost"
        )
        return f"database unavailable: {first}"
    if isinstance(exc, psycopg.Error):
        return f"database error: {exc.diag.message_primary or type(exc).__name__}"
    return f"{type(exc).__name__}: {exc}"


def _fail(message: str) -> int:
    log.debug("command failed", exc_info=True)
    print(f"listener: error: {message}", file=sys.stderr)
    return 1


__all__ = ["ConfigError", "build_parser", "main"]
