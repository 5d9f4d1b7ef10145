"""`listener status`: the state of the work, for people and for scripts.

The figures come from the stored function `listener_status()` (sql/006),
which reads only indexes of open work, so a status query stays cheap however
much history the tables hold, and psql users can call it too.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, TextIO

import orjson
import psycopg

from listener.config import describe_dsn
from listener.db import connect_sync
from listener.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

DEFAULT_WATCH_SECONDS = 2.0
BAR_WIDTH = 20
STATUS_QUERY = "SELECT listener_status(%s, %s, %s)"
MAX_BATCHES = 50
RECENT_FAILURES = 10
ERROR_CHARS = 200

_GREEN, _RED, _DIM, _BOLD, _RESET = (
    "\x1b[32m",
    "\x1b[31m",
    "\x1b[2m",
    "\x1b[1m",
    "\x1b[0m",
)
# Redraw in place: cursor home, each line clears its own tail, then the rest.
_HOME, _CLEAR_LINE, _CLEAR_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"

Report = dict[str, Any]


def fetch_status(conn: psycopg.Connection[Any]) -> Report:
    """Return the status report of the database behind conn."""
    row = conn.execute(STATUS_QUERY, (MAX_BATCHES, RECENT_FAILURES, ERROR_CHARS))
    fetched = row.fetchone()
    if fetched is None:
        raise RuntimeError("listener_status() returned no row")
    report: Report = fetched[0]
    return report


def encode_json(report: Mapping[str, Any]) -> str:
    """Return the report as one line of JSON with sorted keys."""
    return orjson.dumps(report, option=orjson.OPT_SORT_KEYS).decode()


def print_status(
    dsn: str,
    as_json: bool = False,
    watch: bool | float = False,
    *,
    out: TextIO | None = None,
) -> int:
    """Print the status once, or every `watch` seconds until interrupted; return 0.

    With watch on a terminal the report is redrawn in place; piped, each
    refresh is printed after the last one (JSON: one object per line).
    """
    stream = out or sys.stdout
    styled = stream.isatty() and not as_json
    color = styled and not os.environ.get("NO_COLOR")
    server = describe_dsn(dsn)

    def render(report: Report) -> str:
        if as_json:
            return encode_json(report)
        return render_text(report, server=server, color=color)

    with connect_sync(dsn) as conn:
        if not watch:
            stream.write(render(fetch_status(conn)) + "\n")
            return 0
        interval = DEFAULT_WATCH_SECONDS if watch is True else float(watch)
        try:
            _watch(
                conn, dsn, render, interval, stream, in_place=styled, as_json=as_json
            )
        except KeyboardInterrupt:
            if styled:
                stream.write("\n")
        except BrokenPipeError:
            # The reader went away (`| head`): that ends the watch, not an error.
            _silence_stdout()
        return 0


def _watch(
    conn: psycopg.Connection[Any],
    dsn: str,
    render: Callable[[Report], str],
    interval: float,
    stream: TextIO,
    *,
    in_place: bool,
    as_json: bool,
) -> None:
    """Refresh forever; a lost connection is reported and reopened, not fatal.

    With as_json the report of a problem goes to stderr, so that stdout stays
    one JSON object per line.
    """
    try:
        while True:
            frame: str | None = None
            try:
                if conn.closed:
                    conn = connect_sync(dsn)
                frame = render(fetch_status(conn))
            except (psycopg.OperationalError, DatabaseUnavailable) as exc:
                log.debug("status refresh failed", exc_info=True)
                conn.close()
                problem = (
                    f"database unavailable, retrying every {interval:g}s: "
                    f"{_first_line(exc)}"
                )
                if as_json:
                    print(problem, file=sys.stderr, flush=True)
                else:
                    frame = problem
            if frame is not None:
                _show(stream, frame, in_place=in_place, as_json=as_json)
            time.sleep(interval)
    finally:
        conn.close()


def _show(stream: TextIO, frame: str, *, in_place: bool, as_json: bool) -> None:
    if in_place:
        lines = frame.split("\n")
        stream.write(_HOME + "".join(line + _CLEAR_LINE + "\n" for line in lines))
        stream.write(_CLEAR_BELOW)
    else:
        stream.write(frame + ("\n" if as_json else "\n\n"))
    stream.flush()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that flushing it at exit cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def render_text(report: Mapping[str, Any], *, server: str, color: bool) -> str:
    """Return the report as lines for a person; ANSI colours only if color."""
    paint = _painter(color)
    generated = _parse_time(report["generated_at"])
    lines = [
        paint(_BOLD, f"listener status — {server}")
        + paint(_DIM, f"  {generated:%Y-%m-%d %H:%M:%S %Z}"),
        "",
    ]
    lines += _batch_lines(report, color)
    lines.append("")
    lines += _queue_lines(report)
    lines.append("")
    lines += _in_flight_lines(report)
    lines.append("")
    lines += _failure_lines(report, paint)
    usage = float(report["notification_queue_usage"])
    lines += ["", f"notification queue: {usage:.2%} used"]
    return "\n".join(lines)


def _batch_lines(report: Mapping[str, Any], color: bool) -> list[str]:
    counts = report["batch_counts"]
    batches = report["batches"]
    total_open = counts["uploading"] + counts["queued"] + counts["processing"]
    lines = [
        f"batches in flight: {counts['processing']} processing, "
        f"{counts['queued']} queued, {counts['uploading']} uploading"
    ]
    if not batches:
        lines.append("  (none)")
    for batch in batches:
        done, failed = batch["completed_count"], batch["failed_count"]
        total = batch["total_documents"]
        bar = progress_bar(done, failed, total, color=color)
        lines.append(
            f"  {_short(batch['id'])}  {batch['status']:<10}  "
            f"{_clip(batch['user_id'], 12):<12}  {bar}"
            f"  {done}/{total} done, {failed} failed, {batch['in_flight']} in flight"
            f"  age {format_seconds(batch['age_seconds'])}"
        )
    if total_open > len(batches):
        lines.append(f"  … and {total_open - len(batches)} more")
    return lines


def _queue_lines(report: Mapping[str, Any]) -> list[str]:
    queue = report["queue"]
    line = (
        f"queue: {queue['due']} documents due now, "
        f"{queue['retry_wait']} waiting on retry"
    )
    if queue["next_retry_at"]:
        wait = _parse_time(queue["next_retry_at"]) - _parse_time(report["generated_at"])
        line += f" (next in {format_seconds(wait.total_seconds())})"
    if queue["uploading"]:
        line += f", {queue['uploading']} in batches still uploading"
    oldest = report["oldest_waiting"]
    if oldest is None:
        return [line, "oldest waiting: none"]
    return [
        line,
        f"oldest waiting: {format_seconds(oldest['waiting_seconds'])} "
        f"(document {_short(oldest['document_id'])} of batch "
        f"{_short(oldest['batch_id'])})",
    ]


def _in_flight_lines(report: Mapping[str, Any]) -> list[str]:
    in_flight = report["in_flight"]
    line = f"in flight: {in_flight['documents']} documents"
    if in_flight["expired"]:
        line += (
            f", {in_flight['expired']} with an expired lease (the sweep recovers them)"
        )
    lines = [line]
    for owner in in_flight["owners"]:
        expires = owner["expires_in_seconds"]
        when = (
            f"nearest lease expiry in {format_seconds(expires)}"
            if expires >= 0
            else f"a lease expired {format_seconds(-expires)} ago"
        )
        lines.append(f"  {owner['owner']}: {owner['documents']} documents, {when}")
    return lines


def _failure_lines(report: Mapping[str, Any], paint: _Paint) -> list[str]:
    failures = report["recent_failures"]
    if not failures:
        return ["recent failures: none"]
    lines = [f"recent failures (last {len(failures)}):"]
    for failure in failures:
        failed_at = _parse_time(failure["failed_at"]) if failure["failed_at"] else None
        stamp = f"{failed_at:%H:%M:%S}" if failed_at else "?"
        lines.append(
            f"  {stamp}  {_short(failure['document_id'])} "
            f"{_clip(failure['file_name'], 24)} (batch {_short(failure['batch_id'])}, "
            f"{_attempts(failure['attempts'])}): "
            + paint(_RED, _one_line(failure["error"] or ""))
        )
    return lines


_Paint = Callable[[str, str], str]


def _painter(color: bool) -> _Paint:
    if color:
        return lambda code, text: f"{code}{text}{_RESET}"
    return lambda code, text: text


def progress_bar(done: int, failed: int, total: int, *, color: bool = False) -> str:
    """Return a bar of completed, failed and remaining documents.

    Plain, `#` is completed, `x` failed and `.` still to do; in colour, the
    same as green, red and dim blocks.
    """
    if total <= 0:
        return "[" + " " * BAR_WIDTH + "]"
    done_cells = min(round(BAR_WIDTH * done / total), BAR_WIDTH)
    failed_cells = min(round(BAR_WIDTH * failed / total), BAR_WIDTH - done_cells)
    rest = BAR_WIDTH - done_cells - failed_cells
    if not color:
        return "[" + "#" * done_cells + "x" * failed_cells + "." * rest + "]"
    paint = _painter(True)
    return (
        "["
        + paint(_GREEN, "█" * done_cells)
        + paint(_RED, "█" * failed_cells)
        + paint(_DIM, "░" * rest)
        + "]"
    )


def format_seconds(seconds: float) -> str:
    """Return a duration as 850ms, 4.2s, 3m05s or 2h10m."""
    seconds = float(seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _attempts(count: int) -> str:
    if count == 0:
        return "never tried"
    return f"{count} attempt" + ("" if count == 1 else "s")


def _short(uuid_text: str) -> str:
    return str(uuid_text)[:8]


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _one_line(text: str) -> str:
    return " ".join(text.split())
