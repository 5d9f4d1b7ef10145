"""Start, watch and stop one `listener run` process for a benchmark."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psycopg

from bench.common import wait_until

# Extra `listener run` options for every benchmark (python -m bench --listener-arg).
LISTENER_ARGS: list[str] = []
# The LISTEN connection's application_name (listener/listen.py).
LISTEN_APPLICATION = "listener-listen"
REPO = Path(__file__).resolve().parent.parent


@dataclass
class ListenerProcess:
    """A running `listener run` and where its log goes."""

    process: subprocess.Popen[bytes]
    log: IO[bytes]

    @property
    def pid(self) -> int:
        """Return the process id."""
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        """Return the last lines the listener logged."""
        self.log.flush()
        self.log.seek(0)
        return "\n".join(self.log.read().decode(errors="replace").splitlines()[-lines:])


def _is_listening(conn: psycopg.Connection[Any], dbname: str) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = %s AND application_name = %s",
        (dbname, LISTEN_APPLICATION),
    ).fetchone()
    return bool(row and row[0])


@contextlib.contextmanager
def listener_running(
    dsn: str, extractor: str, extra: Sequence[str] = ()
) -> Iterator[ListenerProcess]:
    """Run `listener run` on dsn until the block ends; yield once it LISTENs."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), env.get("PYTHONPATH", "")) if p
    )
    command = [
        sys.executable,
        "-m",
        "listener",
        "run",
        "--dsn",
        dsn,
        "--extractor",
        extractor,
        "--log-level",
        "WARNING",
        *extra,
        *LISTENER_ARGS,
    ]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
        )
        running = ListenerProcess(process, log)
        try:
            dbname = str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])
            with psycopg.connect(dsn, autocommit=True) as conn:
                wait_until(
                    lambda: _is_listening(conn, dbname) or process.poll() is not None,
                    30,
                    "the listener to LISTEN",
                )
            if process.poll() is not None:
                raise RuntimeError(
                    f"listener exited with {process.returncode}:\n{running.log_tail()}"
                )
            # Let the start-up sweep run on the empty tables first.
            time.sleep(0.3)
            yield running
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
