"""Extractors the benchmarks run inside `listener run`."""

from __future__ import annotations

import time
from typing import Any

from listener.extractors import Document


def stamp(document: Document) -> dict[str, Any]:
    """Return when the extractor started, on the host's monotonic clock.

    CLOCK_MONOTONIC is one clock for every process of the host, so the
    benchmark compares it with the time its own COMMIT returned.
    """
    return {"started": time.monotonic()}


async def stamp_async(document: Document) -> dict[str, Any]:
    """Return when the (async) extractor started, on the host's monotonic clock."""
    return {"started": time.monotonic()}
