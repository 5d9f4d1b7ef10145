"""Exceptions of the listener package; all share one base class."""

from __future__ import annotations


class ListenerError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(ListenerError):
    """A setting, option or extractor path that cannot be used."""


class DatabaseUnavailable(ListenerError):
    """The database cannot be reached or refused the connection."""


class MigrationError(ListenerError):
    """A migration file could not be applied."""


class EmbeddedUnavailable(ListenerError):
    """The embedded PostgreSQL cannot be started."""


class PermanentError(ListenerError):
    """Raised by an extractor to fail a document at once, without retries."""
