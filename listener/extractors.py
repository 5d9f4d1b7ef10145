"""The extractor interface, the built-in extractors, and running one safely."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib
import inspect
import re
import types
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID

import anyio
import anyio.to_thread
import orjson

from listener.errors import ConfigError, PermanentError

Extractor = Callable[["Document"], "Mapping[str, Any] | Awaitable[Mapping[str, Any]]"]
OutcomeKind = Literal["completed", "failed", "error"]

# Errors are stored in a text column; keep them readable and bounded.
MAX_ERROR_CHARS = 2000
_WORD = re.compile(r"\w+")


@dataclass(frozen=True, slots=True)
class Document:
    """A document handed to an extractor; `attempt` is 1 on the first try."""

    id: UUID
    batch_id: UUID
    user_id: str
    file_name: str
    content: bytes | None
    storage_url: str | None
    attempt: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one extraction try produced: a JSON result or an error.

    kind is "completed", "failed" (permanent) or "error" (may be retried).
    """

    kind: OutcomeKind
    result_json: bytes | None = None
    error: str | None = None


def text_statistics(document: Document) -> dict[str, Any]:
    """Return text statistics and a SHA-256 digest of a UTF-8 document.

    :raises PermanentError: the document has no content or is not UTF-8 text.
    """
    if document.content is None:
        raise PermanentError(
            "document has no content; the built-in extractor cannot fetch "
            "storage_url, pass --extractor to use one that can"
        )
    try:
        text = document.content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PermanentError(
            f"content is not UTF-8 text ({len(document.content)} bytes, "
            f"invalid byte at offset {exc.start}); binary files need another extractor"
        ) from exc
    if "\x00" in text:
        raise PermanentError(
            "content holds NUL bytes; binary files need another extractor"
        )

    words = _WORD.findall(text.lower())
    return {
        "sha256": hashlib.sha256(document.content).hexdigest(),
        "bytes": len(document.content),
        "characters": len(text),
        "lines": text.count("\n") + (1 if text and not text.endswith("\n") else 0),
        "words": len(words),
        "top_words": [word for word, _ in Counter(words).most_common(5)],
    }


async def noop(document: Document) -> dict[str, Any]:
    """Return an empty result at once; for benchmarks and tests.

    Async, as the no-op jobs of queue benchmarks are: it measures the
    listener's own cost per document, without a worker-thread hand-off.
    """
    return {}


def load_extractor(spec: str) -> Extractor:
    """Return the callable named by MODULE:FUNCTION.

    :raises ConfigError: the spec is malformed, or names nothing callable.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"extractor {spec!r} must look like MODULE:FUNCTION")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"extractor module {module_name!r} not found: {exc}") from exc
    except Exception as exc:
        raise ConfigError(
            f"extractor module {module_name!r} failed to import: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    target: Any = module
    for part in attribute.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ConfigError(f"extractor module {module_name!r} has no {attribute!r}")
    if not callable(target):
        raise ConfigError(f"extractor {spec!r} is not callable")
    extractor: Extractor = target
    return extractor


async def run_extractor(
    extractor: Extractor, document: Document, timeout: float
) -> Outcome:
    """Run one extraction try and turn whatever happens into an Outcome.

    A sync extractor runs in a worker thread. Past `timeout` seconds the try is
    an error; a sync extractor's thread cannot be interrupted and finishes in
    the background, its result discarded.
    """
    try:
        if inspect.iscoroutinefunction(extractor):
            result = await _await_within(extractor(document), timeout)
        else:
            with anyio.fail_after(timeout):
                result = await anyio.to_thread.run_sync(
                    _call_sync, extractor, document, abandon_on_cancel=True
                )
    except PermanentError as exc:
        return Outcome("failed", error=_error_text(exc))
    except TimeoutError:
        return Outcome("error", error=f"extraction timed out after {timeout:g} s")
    except Exception as exc:
        return Outcome("error", error=_error_text(exc))
    return encode_result(result)


async def _await_within(coro: Coroutine[Any, Any, Any], timeout: float) -> Any:
    """Await coro, failing after timeout seconds.

    The coroutine's first step runs at once: one that returns without
    suspending (a cache hit, a no-op) cannot run past the timeout, and skips
    the timer that costs more than the extraction itself. The rest runs under
    asyncio's own timeout, not an anyio cancel scope: a scope entered now would
    sit inside any scope the extractor's first step entered (a task group, a
    client's own timeout), and anyio refuses scopes that exit out of order.
    """
    try:
        suspended_on = coro.send(None)
    except StopIteration as done:
        return done.value
    async with asyncio.timeout(timeout):
        return await _resume(coro, suspended_on)


@types.coroutine
def _resume(
    coro: Coroutine[Any, Any, Any], suspended_on: Any
) -> Generator[Any, Any, Any]:
    """Finish a coroutine already started, as `await` would have.

    What the event loop sends or throws (a cancellation) goes to the coroutine.
    """
    message = suspended_on
    while True:
        try:
            sent = yield message
        except BaseException as exc:
            step = functools.partial(coro.throw, exc)
        else:
            step = functools.partial(coro.send, sent)
        try:
            message = step()
        except StopIteration as done:
            return done.value


def _call_sync(extractor: Extractor, document: Document) -> Any:
    result = extractor(document)
    if inspect.isawaitable(result):
        raise ConfigError(
            "extractor returned an awaitable from a sync call; make it async def"
        )
    return result


def encode_result(result: object) -> Outcome:
    """Serialise an extractor's result for the jsonb column, or fail the document."""
    if not isinstance(result, Mapping):
        return Outcome(
            "failed",
            error=f"extractor returned {type(result).__name__}, not a mapping",
        )
    try:
        encoded = orjson.dumps(result)
    except TypeError as exc:
        return Outcome(
            "failed", error=f"extractor result is not JSON-serialisable: {exc}"
        )
    # PostgreSQL's jsonb cannot hold the NUL character.
    if b"\\u0000" in encoded:
        return Outcome(
            "failed", error="extractor result holds a NUL character (\\u0000)"
        )
    return Outcome("completed", result_json=encoded)


def _error_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if not isinstance(exc, PermanentError):
        text = f"{type(exc).__name__}: {text}"
    text = text.replace("\x00", "")
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 1] + "…"
    return text
