"""compose.yaml and the Dockerfile it builds; no Docker engine runs here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from deploy_files import ROOT, listener_args, load_yaml, parse_listener_args

COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"


def check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    """Validate path against the Compose specification's schema, built in."""
    executable = Path(sys.executable).with_name("check-jsonschema")
    return subprocess.run(
        [str(executable), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def compose() -> Any:
    return load_yaml(COMPOSE)


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, duration
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


def test_compose_file_follows_the_compose_specification() -> None:
    result = check_jsonschema(COMPOSE)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok -- validation done" in result.stdout


def test_the_schema_check_rejects_a_file_that_breaks_the_specification(
    tmp_path: Path,
) -> None:
    broken = tmp_path / "compose.yaml"
    text = COMPOSE.read_text(encoding="utf-8")
    broken.write_text(
        text.replace("    restart: unless-stopped", "    restrat: always", 1)
    )

    result = check_jsonschema(broken)

    assert result.returncode == 1
    assert "restrat" in result.stdout + result.stderr


def test_postgres_is_version_15_with_a_health_check(compose: Any) -> None:
    postgres = compose["services"]["postgres"]

    assert postgres["image"] == "postgres:15"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])


def test_migrate_runs_once_when_postgres_is_healthy(compose: Any) -> None:
    migrate = compose["services"]["migrate"]

    assert parse_listener_args(migrate["command"]).verb == "migrate"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["restart"] == "no"


def test_listener_restarts_and_is_checked_against_readyz(compose: Any) -> None:
    listener = compose["services"]["listener"]

    args = parse_listener_args(listener["command"])

    assert args.verb == "run"
    assert listener["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )
    assert listener["restart"] == "unless-stopped"
    probe = " ".join(listener["healthcheck"]["test"])
    assert f"127.0.0.1:{args.metrics_port}/readyz" in probe
    assert str(args.metrics_port) in listener["expose"]
    # Compose must wait longer than the listener's own grace before SIGKILL.
    assert _seconds(listener["stop_grace_period"]) > args.shutdown_grace


def test_sweep_service_runs_listener_sweep_every_minute(compose: Any) -> None:
    sweep = compose["services"]["sweep"]
    script = sweep["command"][0]

    assert parse_listener_args(listener_args(script)).verb == "sweep"
    assert "sleep 60" in script
    assert sweep["restart"] == "unless-stopped"
    assert sweep["init"] is True


def test_every_listener_service_gets_the_database_from_the_environment(
    compose: Any,
) -> None:
    for name in ("migrate", "listener", "sweep"):
        service = compose["services"][name]
        assert service["build"] == "."
        assert service["environment"]["DATABASE_URL"].startswith(
            "postgresql://listener:listener@postgres:5432/"
        )


def test_dockerfile_copies_what_exists_and_runs_a_real_command() -> None:
    lines = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY ")]
    sources = [s for words in copies for s in words if not s.startswith("--")]
    cmd = next(line for line in lines if line.startswith("CMD "))
    entrypoint = next(line for line in lines if line.startswith("ENTRYPOINT "))
    expose = next(line for line in lines if line.startswith("EXPOSE "))

    assert sources
    assert all((ROOT / source).exists() for source in sources if source != "/wheels")
    assert entrypoint == 'ENTRYPOINT ["listener"]'
    args = parse_listener_args(re.findall(r'"([^"]+)"', cmd))
    assert args.verb == "run"
    assert expose.split()[1] == str(args.metrics_port)
