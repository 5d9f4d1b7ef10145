"""Extractors for the tests: `--extractor extractors_for_tests:NAME`.

The CLI tests put this directory on the child's PYTHONPATH. Extractors that
record their calls append one line per call, `<document id> <attempt>`, to the
file named by $LISTENER_TEST_RECORD; appends of short lines are atomic, so
several processes may share the file.
"""

from __future__ import annotations

import os
import time
from typing import Any

import anyio

from listener import Document, PermanentError

RECORD_ENV = "LISTENER_TEST_RECORD"
SLEEP_ENV = "LISTENER_TEST_SLEEP"


def _record(document: Document) -> None:
    path = os.environ.get(RECORD_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(f"{document.id} {document.attempt}\n")


def _sleep_seconds(default: float) -> float:
    return float(os.environ.get(SLEEP_ENV, default))


def record(document: Document) -> dict[str, Any]:
    """Record the call and return the document's name and attempt."""
    _record(document)
    return {"file_name": document.file_name, "attempt": document.attempt}


async def record_async(document: Document) -> dict[str, Any]:
    """Record the call from a coroutine and return the document's attempt."""
    _record(document)
    await anyio.sleep(0)
    return {"file_name": document.file_name, "attempt": document.attempt, "async": True}


async def slow_record(document: Document) -> dict[str, Any]:
    """Record the call, then sleep $LISTENER_TEST_SLEEP seconds (default 0.02)."""
    _record(document)
    await anyio.sleep(_sleep_seconds(0.02))
    return {"file_name": document.file_name}


def always_raise(document: Document) -> dict[str, Any]:
    """Record the call and raise a retryable error naming the attempt."""
    _record(document)
    raise RuntimeError(f"boom on attempt {document.attempt}")


async def always_raise_async(document: Document) -> dict[str, Any]:
    """Record the call and raise a retryable error from a coroutine."""
    _record(document)
    raise ValueError(f"async boom on attempt {document.attempt}")


def fail_first_try(document: Document) -> dict[str, Any]:
    """Raise on the first attempt, succeed on later ones."""
    _record(document)
    if document.attempt == 1:
        raise RuntimeError("flaky first try")
    return {"attempt": document.attempt}


def permanent(document: Document) -> dict[str, Any]:
    """Record the call and fail the document permanently."""
    _record(document)
    raise PermanentError(f"unreadable {document.file_name}")


async def sleep_async(document: Document) -> dict[str, Any]:
    """Record the call, then sleep $LISTENER_TEST_SLEEP seconds (default 30)."""
    _record(document)
    await anyio.sleep(_sleep_seconds(30))
    return {"slept": True}


def sleep_sync(document: Document) -> dict[str, Any]:
    """Record the call, then block its thread $LISTENER_TEST_SLEEP seconds."""
    _record(document)
    time.sleep(_sleep_seconds(1))
    return {"slept": True}


def returns_list(document: Document) -> Any:
    """Return a JSON array, which is not a mapping."""
    _record(document)
    return [1, 2, 3]


def returns_unserialisable(document: Document) -> dict[str, Any]:
    """Return a mapping holding a value JSON cannot represent."""
    _record(document)
    return {"when": object()}


def returns_nul(document: Document) -> dict[str, Any]:
    """Return a mapping whose string holds a NUL, which jsonb cannot store."""
    _record(document)
    return {"text": "a\x00b"}
