"""Running an async extractor: its first step runs at once, the rest under a timeout."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import pytest

from listener import Document, PermanentError
from listener.extractors import Outcome, run_extractor


def _document() -> Document:
    return Document(
        id=uuid.uuid4(),
        batch_id=uuid.uuid4(),
        user_id="u1",
        file_name="a.txt",
        content=b"hello",
        storage_url=None,
        attempt=1,
    )


def _run(extractor: Any, timeout: float = 10) -> Outcome:
    return anyio.run(run_extractor, extractor, _document(), timeout)


def test_an_extractor_that_never_suspends_completes() -> None:
    async def extract(document: Document) -> dict[str, Any]:
        return {"file": document.file_name}

    assert _run(extract) == Outcome("completed", result_json=b'{"file":"a.txt"}')


def test_an_extractor_that_suspends_many_times_gets_its_result_stored() -> None:
    async def extract(document: Document) -> dict[str, Any]:
        total = 0
        for step in range(5):
            await anyio.sleep(0.001)
            total += step
        return {"total": total}

    assert _run(extract) == Outcome("completed", result_json=b'{"total":10}')


def test_an_error_raised_after_suspending_is_retryable() -> None:
    async def extract(document: Document) -> dict[str, Any]:
        await anyio.sleep(0)
        raise ValueError("page 3 unreadable")

    assert _run(extract) == Outcome("error", error="ValueError: page 3 unreadable")


def test_a_permanent_error_raised_after_suspending_fails_the_document() -> None:
    async def extract(document: Document) -> dict[str, Any]:
        await anyio.sleep(0)
        raise PermanentError("encrypted PDF")

    assert _run(extract) == Outcome("failed", error="encrypted PDF")


def test_the_timeout_cancels_inside_the_extractor_so_its_cleanup_runs() -> None:
    cleaned_up: list[bool] = []

    async def extract(document: Document) -> dict[str, Any]:
        try:
            await anyio.sleep(30)
        finally:
            cleaned_up.append(True)
        return {}

    outcome = _run(extract, timeout=0.05)

    assert outcome == Outcome("error", error="extraction timed out after 0.05 s")
    assert cleaned_up == [True]


def test_an_extractor_may_catch_a_cancellation_and_clean_up_asynchronously() -> None:
    steps: list[str] = []

    async def extract(document: Document) -> dict[str, Any]:
        try:
            await anyio.sleep(30)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.001)
                steps.append("closed its connection")
        return {}

    outcome = _run(extract, timeout=0.05)

    assert outcome.kind == "error"
    assert steps == ["closed its connection"]


def test_cancelling_the_caller_cancels_the_suspended_extractor() -> None:
    seen: list[str] = []

    async def extract(document: Document) -> dict[str, Any]:
        try:
            await anyio.sleep(30)
        except anyio.get_cancelled_exc_class():
            seen.append("cancelled")
            raise
        return {}

    async def main() -> None:
        with anyio.move_on_after(0.05):
            await run_extractor(extract, _document(), 10)

    anyio.run(main)

    assert seen == ["cancelled"]


@pytest.mark.parametrize("suspend", [False, True])
def test_each_document_gets_its_own_timeout(suspend: bool) -> None:
    """A cheap document before a slow one does not use up the slow one's time."""

    async def extract(document: Document) -> dict[str, Any]:
        if suspend:
            await anyio.sleep(0.02)
        return {}

    async def main() -> list[Outcome]:
        return [await run_extractor(extract, _document(), 1) for _ in range(5)]

    assert [o.kind for o in anyio.run(main)] == ["completed"] * 5


def test_an_extractor_with_its_own_cancel_scope_and_task_group_completes() -> None:
    """Scopes the extractor enters in its first step must not clash with ours."""

    async def extract(document: Document) -> dict[str, Any]:
        with anyio.fail_after(5):
            await anyio.sleep(0.01)
        async with anyio.create_task_group() as group:
            group.start_soon(anyio.sleep, 0.01)
        return {"ok": True}

    assert _run(extract) == Outcome("completed", result_json=b'{"ok":true}')


def test_an_extractor_hanging_inside_its_own_task_group_times_out() -> None:
    async def extract(document: Document) -> dict[str, Any]:
        async with anyio.create_task_group():
            await anyio.sleep(60)
        return {}

    outcome = _run(extract, timeout=0.2)

    assert outcome.kind == "error"
    assert outcome.error == "extraction timed out after 0.2 s"
