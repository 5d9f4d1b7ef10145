"""The extractor interface: the built-in extractor, loading, and running one."""

from __future__ import annotations

import hashlib
import threading
import uuid
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from listener import Document, PermanentError
from listener.errors import ConfigError
from listener.extractors import (
    MAX_ERROR_CHARS,
    Extractor,
    Outcome,
    encode_result,
    load_extractor,
    noop,
    run_extractor,
    text_statistics,
)


def _document(content: bytes | None = b"hello", attempt: int = 1) -> Document:
    return Document(
        id=uuid.uuid4(),
        batch_id=uuid.uuid4(),
        user_id="u1",
        file_name="a.txt",
        content=content,
        storage_url=None,
        attempt=attempt,
    )


def _run(extractor: Extractor, document: Document, timeout: float = 10) -> Outcome:
    return anyio.run(run_extractor, extractor, document, timeout)


# --- the built-in extractor -------------------------------------------------


def test_text_statistics_counts_and_digests_the_text() -> None:
    content = "Café au lait\nthe café is open, the bar is not\nthe end".encode()

    result = text_statistics(_document(content))

    assert result == {
        "sha256": hashlib.sha256(content).hexdigest(),
        "bytes": len(content),
        "characters": len(content) - 2,
        "lines": 3,
        "words": 13,
        "top_words": ["the", "café", "is", "au", "lait"],
    }


def test_text_statistics_counts_a_final_newline_once() -> None:
    assert text_statistics(_document(b"one\ntwo\n"))["lines"] == 2
    assert text_statistics(_document(b""))["lines"] == 0


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"\x89PNG\r\n\x1a\n\xff", "not UTF-8 text"),
        (b"text with a \x00 inside", "NUL bytes"),
        (None, "no content"),
    ],
)
def test_text_statistics_fails_binary_content_permanently(
    content: bytes | None, reason: str
) -> None:
    with pytest.raises(PermanentError, match=reason):
        text_statistics(_document(content))


# --- loading ----------------------------------------------------------------


def test_load_extractor_returns_the_named_callable() -> None:
    assert load_extractor("listener.extractors:noop") is noop
    assert load_extractor("listener:extractors.noop") is noop


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("listener.extractors", "must look like MODULE:FUNCTION"),
        (":noop", "must look like MODULE:FUNCTION"),
        ("no_such_module_xyz:run", "extractor module 'no_such_module_xyz' not found"),
        ("listener.extractors:missing", "has no 'missing'"),
        ("listener.extractors:MAX_ERROR_CHARS", "is not callable"),
    ],
)
def test_load_extractor_names_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_extractor(spec)


def test_load_extractor_reports_a_module_that_fails_to_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_extractor_xyz.py").write_text("raise RuntimeError('oops')\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    with pytest.raises(ConfigError, match="failed to import: RuntimeError: oops"):
        load_extractor("broken_extractor_xyz:run")


# --- running ----------------------------------------------------------------


def test_sync_extractor_runs_off_the_event_loop_thread() -> None:
    threads: list[int] = []

    def extract(document: Document) -> dict[str, Any]:
        threads.append(threading.get_ident())
        return {"attempt": document.attempt}

    outcome = _run(extract, _document(attempt=2))

    assert outcome == Outcome("completed", result_json=b'{"attempt":2}')
    assert threads and threads[0] != threading.get_ident()


def test_async_extractor_is_awaited() -> None:
    async def extract(document: Document) -> dict[str, Any]:
        await anyio.sleep(0)
        return {"name": document.file_name}

    outcome = _run(extract, _document())

    assert outcome.kind == "completed"
    assert outcome.result_json is not None
    assert orjson.loads(outcome.result_json) == {"name": "a.txt"}


def test_permanent_error_fails_the_document() -> None:
    def extract(document: Document) -> dict[str, Any]:
        raise PermanentError("cannot read this")

    assert _run(extract, _document()) == Outcome("failed", error="cannot read this")


def test_other_exceptions_are_retryable_errors_naming_their_type() -> None:
    async def extract(document: Document) -> dict[str, Any]:
        raise KeyError("page")

    assert _run(extract, _document()) == Outcome("error", error="KeyError: 'page'")


def test_running_past_the_timeout_is_a_retryable_error() -> None:
    async def extract(document: Document) -> dict[str, Any]:
        await anyio.sleep(30)
        return {}

    outcome = _run(extract, _document(), timeout=0.05)

    assert outcome == Outcome("error", error="extraction timed out after 0.05 s")


class _Awaitable:
    """An awaitable that is no coroutine, so dropping it never warns."""

    def __await__(self) -> Any:
        yield None


def test_sync_extractor_returning_an_awaitable_is_an_error() -> None:
    def extract(document: Document) -> Any:
        return _Awaitable()

    outcome = _run(extract, _document())

    assert outcome.kind == "error"
    assert outcome.error is not None
    assert "make it async def" in outcome.error


def test_long_error_messages_are_cut_and_lose_nul_characters() -> None:
    def extract(document: Document) -> dict[str, Any]:
        raise RuntimeError("x\x00" * 5000)

    outcome = _run(extract, _document())

    assert outcome.error is not None
    assert len(outcome.error) == MAX_ERROR_CHARS
    assert "\x00" not in outcome.error
    assert outcome.error.endswith("…")


# --- results ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("result", "message"),
    [
        ([1, 2], "extractor returned list, not a mapping"),
        (None, "extractor returned NoneType, not a mapping"),
        ({"when": object()}, "not JSON-serialisable"),
        ({"text": "a\x00b"}, "NUL character"),
    ],
)
def test_unusable_results_fail_the_document(result: object, message: str) -> None:
    outcome = encode_result(result)

    assert outcome.kind == "failed"
    assert outcome.error is not None
    assert message in outcome.error


def test_usable_results_are_encoded_as_json() -> None:
    outcome = encode_result({"words": 3, "top": ["a"], "nested": {"ok": True}})

    assert outcome.kind == "completed"
    assert outcome.result_json is not None
    assert orjson.loads(outcome.result_json) == {
        "words": 3,
        "top": ["a"],
        "nested": {"ok": True},
    }
