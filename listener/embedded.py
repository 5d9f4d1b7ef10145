"""The embedded PostgreSQL used when no DSN is given: a real server from pgserver."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

from listener.errors import EmbeddedUnavailable

log = logging.getLogger(__name__)


def default_data_dir() -> Path:
    """Return the per-user data directory of the embedded server."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "listener" / "pgdata"


def start_embedded(data_dir: Path) -> str:
    """Start (or join) the embedded server in data_dir and return its DSN.

    The server keeps running after this process exits, so that psql and later
    commands can join it.

    :raises EmbeddedUnavailable: pgserver is not installed or cannot start.
    """
    os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError as exc:
        raise EmbeddedUnavailable(
            "no --dsn or DATABASE_URL given and the embedded PostgreSQL is not "
            "installed: pip install 'pg-batch-listener[embedded]'"
        ) from exc
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        get_server = getattr(pgserver, "get_server")  # noqa: B009 - untyped package
        server = get_server(data_dir, cleanup_mode=None)
    except Exception as exc:
        raise EmbeddedUnavailable(
            f"the embedded PostgreSQL in {data_dir} did not start: {exc}"
        ) from exc
    dsn: str = server.get_uri()
    log.info("embedded PostgreSQL running, data in %s", data_dir)
    return dsn
