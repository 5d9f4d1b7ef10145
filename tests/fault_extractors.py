"""Extractors for the fault-injection suite: `--extractor fault_extractors:NAME`.

Each appends `<document id> <attempt> <pid>` to $LISTENER_TEST_RECORD for
every call, so a test can count tries per document and per process.
"""

from __future__ import annotations

import os
import time
from typing import Any

import anyio

from listener import Document

RECORD_ENV = "LISTENER_TEST_RECORD"
SLEEP_ENV = "LISTENER_FAULT_SLEEP"
HUGE_BYTES_ENV = "LISTENER_FAULT_HUGE_BYTES"


def _record(document: Document) -> None:
    path = os.environ.get(RECORD_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(f"{document.id} {document.attempt} {os.getpid()}\n")


async def steady(document: Document) -> dict[str, Any]:
    """Record the call, work $LISTENER_FAULT_SLEEP seconds, return a small result."""
    _record(document)
    await anyio.sleep(float(os.environ.get(SLEEP_ENV, "0.01")))
    assert document.content is not None
    return {"bytes": len(document.content), "attempt": document.attempt}


def chaos(document: Document) -> dict[str, Any]:
    """Behave as the file name says: hang-*, raise-*, flaky-*, nonjson-*, huge-*.

    A sync extractor, so a hang blocks a worker thread for good, as a stuck
    network call in real extraction code would. Anything else is steady work.
    """
    _record(document)
    kind = document.file_name.partition("-")[0]
    if kind == "hang":
        time.sleep(3600)
    if kind == "raise":
        raise RuntimeError(f"extractor crashed on attempt {document.attempt}")
    if kind == "flaky" and document.attempt == 1:
        raise ConnectionError("upstream model unavailable")
    if kind == "nonjson":
        return {"parsed": {1, 2, 3}, "when": object()}
    if kind == "huge":
        size = int(os.environ.get(HUGE_BYTES_ENV, str(20_000_000)))
        return {"text": "x" * size}
    time.sleep(float(os.environ.get(SLEEP_ENV, "0.005")))
    return {"file_name": document.file_name, "attempt": document.attempt}
