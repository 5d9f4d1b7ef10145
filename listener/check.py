"""The consistency check: `listener check`, a thin call of listener_check()."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from uuid import UUID

from listener.db import connect_sync

log = logging.getLogger(__name__)

_CHECK = (
    "SELECT invariant, batch_id, document_id, user_id, detail"
    " FROM listener_check(%s, %s, %s)"
)


@dataclass(frozen=True, slots=True)
class Finding:
    """One violation of an invariant, as listener_check() reports it."""

    invariant: str
    batch_id: UUID | None
    document_id: UUID | None
    user_id: str | None
    detail: str

    def describe(self) -> str:
        """Return the finding as one line: invariant, the ids involved, detail."""
        where = [
            f"{name}={value}"
            for name, value in (
                ("batch", self.batch_id),
                ("document", self.document_id),
                ("user", self.user_id),
            )
            if value is not None
        ]
        return f"{self.invariant} {' '.join(where)}: {self.detail}"


def find_violations(
    dsn: str,
    *,
    max_attempts: int = 3,
    lease_grace: float = 120.0,
    report_usage_excess: bool = True,
) -> list[Finding]:
    """Return every violation of the invariants, read in one snapshot.

    :raises DatabaseUnavailable: the server is unreachable.
    """
    with connect_sync(dsn) as conn:
        rows = conn.execute(
            _CHECK, (max_attempts, lease_grace, report_usage_excess)
        ).fetchall()
    findings = [Finding(*row) for row in rows]
    if findings:
        log.warning("consistency check found %d violations", len(findings))
    return findings
