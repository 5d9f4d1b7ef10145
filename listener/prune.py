"""Table growth: `listener prune`, finished batches deleted in bounded chunks."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from listener.db import connect_sync
from listener.errors import ConfigError

log = logging.getLogger(__name__)

_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass(frozen=True, slots=True)
class PruneSummary:
    """What one prune run deleted."""

    cutoff: datetime
    batches: int
    documents: int
    chunks: int

    def describe(self) -> str:
        """Return the one-line summary printed at the end of a prune."""
        return (
            f"prune: deleted {self.batches} batches and {self.documents} documents "
            f"finished before {self.cutoff.isoformat(timespec='seconds')} "
            f"in {self.chunks} chunks"
        )


def parse_duration(text: str) -> timedelta:
    """Return the duration written like 30d, 12h, 45m, 90s, 2w or 1d12h.

    :raises ConfigError: the text is not such a duration.
    """
    spec = text.strip().lower()
    parts = _PART.findall(spec)
    if not spec or "".join(n + u for n, u in parts) != spec:
        raise ConfigError(
            f"duration {text!r} must look like 30d, 12h, 45m, 90s, 2w or 1d12h"
        )
    return timedelta(seconds=sum(float(n) * _UNIT_SECONDS[u] for n, u in parts))


def prune_finished(
    dsn: str, older_than: timedelta, *, chunk_batches: int = 1000
) -> PruneSummary:
    """Delete finished batches completed more than older_than ago, with their
    documents, one chunk of at most chunk_batches per transaction.

    :raises DatabaseUnavailable: the server is unreachable.
    """
    with connect_sync(dsn) as conn:
        row = conn.execute("SELECT now() - %s::interval", (older_than,)).fetchone()
        assert row is not None
        cutoff: datetime = row[0]
        batches = documents = chunks = 0
        while True:
            # Autocommit: each chunk is its own transaction, its locks released
            # before the next one is taken.
            chunk = conn.execute(
                "SELECT batches, documents FROM listener_prune_chunk(%s, %s)",
                (cutoff, chunk_batches),
            ).fetchone()
            if chunk is None or chunk[0] == 0:
                break
            chunks += 1
            batches += chunk[0]
            documents += chunk[1]
            log.debug("pruned %d batches, %d documents", chunk[0], chunk[1])
    summary = PruneSummary(cutoff, batches, documents, chunks)
    log.info(
        "pruned %d batches and %d documents finished before %s",
        batches,
        documents,
        cutoff,
    )
    return summary
