"""Apply the numbered SQL files of `sql/` in order, once each."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import psycopg

from listener.db import connect_sync
from listener.errors import MigrationError

log = logging.getLogger(__name__)

# Any constant works; every migrating session agrees on this one.
MIGRATION_LOCK_KEY = 7_300_142_009
_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered SQL file."""

    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """Return the SHA-256 of the file's text."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


def sql_directory() -> Traversable:
    """Return the folder of migration files: inside the wheel, else the source tree."""
    packaged = resources.files("listener") / "sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "sql"


def load_migrations() -> list[Migration]:
    """Return the migration files in the order they apply."""
    found = []
    for entry in sql_directory().iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(
                Migration(match.group(1), entry.name, entry.read_text("utf-8"))
            )
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a number: {versions}")
    if not found:
        raise MigrationError(f"no migration files in {sql_directory()}")
    return found


def apply_migrations(dsn: str) -> list[str]:
    """Apply every migration not applied yet; return the names applied.

    Blocks while another session migrates the same database: a session-level
    advisory lock serialises hosts, and each file commits with its record.
    """
    migrations = load_migrations()
    with connect_sync(dsn) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            return _apply_locked(conn, migrations)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))


def _apply_locked(
    conn: psycopg.Connection[tuple[object, ...]], migrations: list[Migration]
) -> list[str]:
    conn.execute(
        """
        CREATE TABLE IF NOT EXISTS listener_migrations (
            version text PRIMARY KEY,
            name text NOT NULL,
            checksum text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    applied = {
        version: (name, checksum)
        for version, name, checksum in conn.execute(
            "SELECT version, name, checksum FROM listener_migrations"
        ).fetchall()
    }

    done = []
    for migration in migrations:
        if migration.version in applied:
            if applied[migration.version][1] != migration.checksum:
                log.warning(
                    "migration %s changed after it was applied; not re-applied",
                    migration.name,
                )
            continue
        _apply_one(conn, migration)
        done.append(migration.name)
    return done


def _apply_one(
    conn: psycopg.Connection[tuple[object, ...]], migration: Migration
) -> None:
    log.info("applying migration %s", migration.name)
    try:
        with conn.transaction():
            conn.execute(migration.sql.encode())
            conn.execute(
                "INSERT INTO listener_migrations (version, name, checksum)"
                " VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
    except psycopg.Error as exc:
        raise MigrationError(f"migration {migration.name} failed: {exc}") from exc
