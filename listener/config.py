"""Settings shared by the commands, and a password-free description of a DSN."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

import psycopg.conninfo

from listener.errors import ConfigError

DEFAULT_EXTRACTOR = "listener.extractors:text_statistics"


@dataclass(frozen=True, slots=True)
class ProcessingSettings:
    """How documents are claimed, extracted and retried."""

    extractor: str = DEFAULT_EXTRACTOR
    concurrency: int = 8
    lease_seconds: float = 60.0
    max_attempts: int = 3
    retry_delay: float = 5.0
    retry_cap: float = 300.0
    extract_timeout: float = 300.0
    # Per round trip: claiming 500 costs about two thirds per document of 100.
    claim_size: int = 500
    # Documents with more content fail at claim time, unread; None: no limit.
    max_content_bytes: int | None = None

    def __post_init__(self) -> None:
        _require(
            self.concurrency >= 1,
            f"--concurrency must be at least 1, not {self.concurrency}",
        )
        _require(
            self.lease_seconds >= 1,
            f"--lease-seconds must be at least 1, not {self.lease_seconds}",
        )
        _require(
            self.max_attempts >= 1,
            f"--max-attempts must be at least 1, not {self.max_attempts}",
        )
        _require(
            self.retry_delay >= 0,
            f"--retry-delay must not be negative, not {self.retry_delay}",
        )
        _require(
            self.extract_timeout > 0,
            f"--extract-timeout must be positive, not {self.extract_timeout}",
        )
        _require(
            self.claim_size >= 1,
            f"--claim-size must be at least 1, not {self.claim_size}",
        )
        _require(
            self.max_content_bytes is None or self.max_content_bytes >= 1,
            f"--max-content-bytes must be at least 1, not {self.max_content_bytes}",
        )

    @property
    def heartbeat_seconds(self) -> float:
        """Return how often leases are extended: three times per lease."""
        return self.lease_seconds / 3


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def worker_name() -> str:
    """Return a name for this process that is unique across hosts and restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def describe_dsn(dsn: str) -> str:
    """Return the server a DSN names, as host, port, dbname and user, no password."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "an unparsable DSN"
    host = str(params.get("host") or os.environ.get("PGHOST") or "localhost")
    port = str(params.get("port") or os.environ.get("PGPORT") or "5432")
    dbname = str(params.get("dbname") or os.environ.get("PGDATABASE") or "?")
    user = str(params.get("user") or os.environ.get("PGUSER") or "?")
    return f"host={host} port={port} dbname={dbname} user={user}"


def validate_dsn(dsn: str) -> str:
    """Return the DSN if libpq can parse it; raise ConfigError otherwise.

    The message never repeats the DSN, which may hold a password.
    """
    try:
        psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(
            "the DSN cannot be parsed (expected postgresql://... or key=value pairs)"
        ) from exc
    return dsn
