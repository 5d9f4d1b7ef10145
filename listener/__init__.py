"""Event-driven PostgreSQL document-batch processor."""

from __future__ import annotations

from listener.errors import ListenerError, PermanentError
from listener.extractors import Document

__all__ = ["Document", "ListenerError", "PermanentError"]
__version__ = "0.1.0"
