"""Connections: friendly errors, the work pool, and the connection settings."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from listener.config import describe_dsn
from listener.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

APPLICATION_NAME = "listener"
CONNECT_TIMEOUT = 10


# Kernel-level detection of a vanished peer: keepalive probes after 5 s idle,
# and data left unacknowledged for 10 s, fail the socket. A DSN that sets any
# of these keeps its own value.
KEEPALIVE_OPTIONS: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 2,
    "tcp_user_timeout": 10_000,
}


def keepalive_options(dsn: str) -> dict[str, int]:
    """Return the keepalive settings that the DSN does not set itself."""
    given = conninfo_to_dict(dsn)
    return {k: v for k, v in KEEPALIVE_OPTIONS.items() if k not in given}


def _connect_kwargs() -> dict[str, Any]:
    return {
        "autocommit": True,
        "application_name": APPLICATION_NAME,
        "connect_timeout": CONNECT_TIMEOUT,
    }


def _unavailable(dsn: str, exc: psycopg.Error) -> DatabaseUnavailable:
    # libpq's first line names the host and the reason, never the password.
    reason = (
        str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    )
    return DatabaseUnavailable(f"cannot connect to {describe_dsn(dsn)}: {reason}")


def connect_sync(dsn: str) -> psycopg.Connection[tuple[Any, ...]]:
    """Open an autocommit connection.

    :raises DatabaseUnavailable: the server is unreachable or refuses us.
    """
    try:
        return psycopg.connect(dsn, **_connect_kwargs())
    except psycopg.Error as exc:
        raise _unavailable(dsn, exc) from exc


async def connect(dsn: str, **options: Any) -> psycopg.AsyncConnection[tuple[Any, ...]]:
    """Open an autocommit async connection; options override connection parameters.

    :raises DatabaseUnavailable: the server is unreachable or refuses us.
    """
    try:
        return await psycopg.AsyncConnection.connect(
            dsn, **{**_connect_kwargs(), **options}
        )
    except psycopg.Error as exc:
        raise _unavailable(dsn, exc) from exc


async def open_pool(dsn: str, size: int) -> AsyncConnectionPool:
    """Open a pool of `size` autocommit connections; fail fast if none can open.

    :raises DatabaseUnavailable: the server is unreachable or refuses us.
    """
    # Check reachability first: the pool itself would retry silently.
    probe = await connect(dsn)
    await probe.close()
    pool: AsyncConnectionPool = AsyncConnectionPool(
        dsn,
        min_size=size,
        max_size=size,
        # A half-open socket fails in seconds instead of hanging a query.
        kwargs={**_connect_kwargs(), **keepalive_options(dsn)},
        open=False,
        name="listener-work",
    )
    await pool.open(wait=True, timeout=CONNECT_TIMEOUT)
    return pool
