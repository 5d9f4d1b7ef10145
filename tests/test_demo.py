"""`listener demo`, run as a person would: a subprocess on a fresh data directory."""

from __future__ import annotations

import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import run_cli

pytestmark = pytest.mark.slow

STATUSES = ("completed", "partially_completed", "failed", "cancelled")


@pytest.fixture
def demo_dir() -> Iterator[Path]:
    """Yield a data directory for the demo; stop the server it leaves running.

    Not under tmp_path: run as root, pgserver runs the server as its own user,
    which must traverse the parents, and every pytest session starting on the
    machine resets pytest's temporary root to mode 0700.
    """
    parent = Path(tempfile.mkdtemp(prefix="listener-demo-test-"))
    data_dir = parent / "demo-pgdata"
    try:
        yield data_dir
    finally:
        if (data_dir / "postmaster.pid").exists():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from pgserver import get_server

            get_server(data_dir, cleanup_mode="stop").cleanup()
        shutil.rmtree(parent, ignore_errors=True)


def _dsn_of(output: str) -> str:
    match = re.search(r"psql '([^']+)'", output)
    assert match, output
    return match.group(1)


def _rows(dsn: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(query).fetchall()


def test_demo_takes_every_sample_batch_to_its_terminal_state(demo_dir: Path) -> None:
    result = run_cli("demo", "--data-dir", str(demo_dir), timeout=180)

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    summary = result.stdout[result.stdout.index("most common error") :]
    for sample, status in [
        ("annual-reports", "completed"),
        ("scans-mixed", "partially_completed"),
        ("trial-quota", "partially_completed"),
        ("corrupt-upload", "failed"),
        ("abandoned-upload", "cancelled"),
    ]:
        assert re.search(rf"{sample}\s+{status}\s", summary), summary
    assert "quota exhausted" in summary
    assert "all 5 batches terminal" in result.stdout
    assert "\x1b" not in result.stdout
    assert re.search(r"processing \[.*\] \d+/2120 documents", result.stdout)

    dsn = _dsn_of(result.stdout)
    assert _rows(
        dsn,
        "SELECT status, count(*) FROM extraction_batches GROUP BY status ORDER BY 1",
    ) == [("cancelled", 1), ("completed", 1), ("failed", 1), ("partially_completed", 2)]
    assert _rows(
        dsn,
        "SELECT documents_processed, documents_limit FROM user_usage"
        " WHERE user_id = 'demo-trial-user'",
    ) == [(25, 25)]
    assert _rows(
        dsn, "SELECT count(*) FROM documents WHERE status IN ('uploaded', 'processing')"
    ) == [(0,)]
    # The flaky documents failed their first try and completed on a retry.
    assert _rows(
        dsn,
        "SELECT count(*), min(attempts) FROM documents"
        " WHERE file_name LIKE 'flaky-%' AND status = 'completed'",
    ) == [(8, 2)]


def test_demo_reuses_its_data_directory(demo_dir: Path) -> None:
    first = run_cli("demo", "--data-dir", str(demo_dir), timeout=180)
    assert first.returncode == 0, first.stderr

    second = run_cli("demo", "--data-dir", str(demo_dir), timeout=180)

    assert second.returncode == 0, second.stderr
    assert "(reused)" in second.stdout
    assert "(reused)" not in first.stdout
    dsn = _dsn_of(second.stdout)
    assert _rows(dsn, "SELECT count(*) FROM extraction_batches") == [(10,)]
    # The quota user starts every demo afresh, so it hits the quota again.
    assert _rows(
        dsn,
        "SELECT count(*) FROM extraction_batches"
        " WHERE user_id = 'demo-trial-user' AND completed_count = 25",
    ) == [(2,)]


def test_demo_refuses_a_dsn_rather_than_fill_a_real_database() -> None:
    result = run_cli("demo", "--dsn", "postgresql://app@db.example/prod", timeout=60)

    assert result.returncode == 1
    assert "runs on its own embedded server" in result.stderr
    assert "db.example" not in result.stderr
    assert "Traceback" not in result.stderr
