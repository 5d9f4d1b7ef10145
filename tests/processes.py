"""A real `python -m listener run` child process whose log the test can read.

`from processes import ListenerProcess` in test modules; nothing here is a test.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from helpers import recorded_calls


class ListenerProcess:
    """One `python -m listener run` child in a process group of its own.

    Its stderr is read by a daemon thread into `lines`; stdout is discarded.
    """

    def __init__(
        self,
        dsn: str,
        *options: str,
        extractor: str,
        env: Mapping[str, str] | None = None,
        record: Path | None = None,
    ) -> None:
        child_env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        child_env |= dict(env or {}) | {"DATABASE_URL": dsn}
        self.record = record
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "listener",
                "run",
                "--extractor",
                extractor,
                *options,
            ],
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        """Return the process id, which the worker name (lease_owner) contains."""
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for_line(
        self, pattern: str, timeout: float = 30, after: int = 0
    ) -> re.Match[str]:
        """Return the match of the first log line from index `after` on.

        :raises AssertionError: no line matched within timeout seconds, or the
            process closed its stderr first.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[after:]:
                    if match := regex.search(line):
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    raise AssertionError(
                        f"no log line matching {pattern!r} within {timeout} s:\n"
                        + "\n".join(self.lines[-30:])
                    )
                self._changed.wait(min(left, 0.1))

    def wait_ready(self, timeout: float = 30) -> None:
        """Return once the listener says it is ready."""
        self.wait_for_line(r"listener \S+ ready on ", timeout)

    def signal_group(self, signum: int) -> None:
        """Send signum to the child's whole process group."""
        os.killpg(self.process.pid, signum)

    def exit_code(self, timeout: float = 30) -> int:
        """Wait for the child to exit on its own; return its exit code."""
        code = self.process.wait(timeout)
        self._close()
        return code

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM the group; return the exit code (SIGKILL it if it hangs)."""
        if self.process.poll() is None:
            self.signal_group(signal.SIGTERM)
        try:
            return self.exit_code(timeout)
        finally:
            if self.process.poll() is None:
                self.kill()

    def kill(self) -> None:
        """SIGKILL the whole process group and reap it."""
        if self.process.poll() is None:
            self.signal_group(signal.SIGKILL)
        self.process.wait(10)
        self._close()

    def _close(self) -> None:
        self._reader.join(5)
        assert self.process.stderr is not None
        self.process.stderr.close()

    def calls(self) -> list[tuple[str, int]]:
        """Return the (document id, attempt) calls the recording extractor made."""
        assert self.record is not None, "started without a record file"
        return recorded_calls(self.record)

    def log(self, last: int | None = None) -> str:
        """Return the log lines captured so far, or the last few."""
        with self._changed:
            lines = self.lines if last is None else self.lines[-last:]
            return "\n".join(lines)
