"""deploy/: the systemd units, the crontab line and the Kubernetes manifests."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from deploy_files import (
    INSTALLED_LISTENER,
    ROOT,
    listener_args,
    load_yaml,
    parse_listener_args,
)

SYSTEMD = ROOT / "deploy" / "systemd"
UNITS = ("listener.service", "listener-sweep.service", "listener-sweep.timer")


def read_unit(name: str) -> configparser.ConfigParser:
    """Return a unit file as sections of keys; repeated keys keep the last value."""
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((SYSTEMD / name).read_text(encoding="utf-8"))
    return unit


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="needs systemd-analyze"
)
def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """Verify the units as installed, the listener path pointed at this venv's."""
    here = str(Path(sys.executable).with_name("listener"))
    assert os.access(here, os.X_OK)
    for name in UNITS:
        text = (SYSTEMD / name).read_text(encoding="utf-8")
        (tmp_path / name).write_text(text.replace(INSTALLED_LISTENER, here))

    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(tmp_path / n) for n in UNITS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    # verify exits 0 on unknown keys and bad values, but says so on stderr.
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


def test_systemd_verify_would_catch_a_misspelt_key(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-analyze")
    text = (SYSTEMD / "listener-sweep.timer").read_text(encoding="utf-8")
    (tmp_path / "listener-sweep.timer").write_text(
        text.replace("OnUnitActiveSec=", "OnUnitActivSec=")
    )
    service = (SYSTEMD / "listener-sweep.service").read_text(encoding="utf-8")
    here = str(Path(sys.executable).with_name("listener"))
    (tmp_path / "listener-sweep.service").write_text(
        service.replace(INSTALLED_LISTENER, here)
    )

    result = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            "--man=no",
            str(tmp_path / "listener-sweep.timer"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert "OnUnitActivSec" in result.stderr


def test_listener_service_runs_listener_run_and_restarts() -> None:
    service = read_unit("listener.service")["Service"]

    args = parse_listener_args(listener_args(service["ExecStart"]))

    assert args.verb == "run"
    assert service["ExecStart"].startswith(INSTALLED_LISTENER)
    assert parse_listener_args(listener_args(service["ExecStartPre"])).verb == "migrate"
    assert service["Restart"] == "always"
    assert service["KillSignal"] == "SIGTERM"
    assert float(service["TimeoutStopSec"]) > args.shutdown_grace
    assert service["EnvironmentFile"] == "/etc/listener/listener.env"


def test_sweep_service_is_a_oneshot_listener_sweep() -> None:
    service = read_unit("listener-sweep.service")["Service"]

    args = parse_listener_args(listener_args(service["ExecStart"]))

    assert service["Type"] == "oneshot"
    assert args.verb == "sweep"
    assert args.max_batches_per_run == 10


def test_sweep_timer_starts_the_sweep_every_minute() -> None:
    timer = read_unit("listener-sweep.timer")

    assert timer["Timer"]["Unit"] == "listener-sweep.service"
    assert timer["Timer"]["OnUnitActiveSec"] == "1min"
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_crontab_line_runs_listener_sweep_every_minute() -> None:
    lines = (ROOT / "deploy" / "cron" / "listener-sweep").read_text().splitlines()
    jobs = [
        line
        for line in lines
        if line and not line.startswith("#") and "=" not in line.split()[0]
    ]

    assert len(jobs) == 1
    fields = jobs[0].split(maxsplit=6)
    assert fields[:5] == ["*"] * 5
    assert fields[5] == "listener"
    assert "flock -n" in fields[6]
    assert parse_listener_args(listener_args(fields[6])).verb == "sweep"


def _containers(manifest: Any) -> list[Any]:
    spec = manifest["spec"]
    if manifest["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return list(spec["template"]["spec"]["containers"])


def test_kubernetes_cronjob_sweeps_every_minute_without_overlap() -> None:
    cronjob = load_yaml(ROOT / "deploy" / "kubernetes" / "sweep-cronjob.yaml")

    (container,) = _containers(cronjob)

    assert (cronjob["apiVersion"], cronjob["kind"]) == ("batch/v1", "CronJob")
    assert cronjob["spec"]["schedule"] == "* * * * *"
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert parse_listener_args(container["args"]).verb == "sweep"
    env = {e["name"]: e for e in container["env"]}
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == (
        "listener-database"
    )


def test_kubernetes_deployment_probes_the_health_endpoints() -> None:
    deployment = load_yaml(ROOT / "deploy" / "kubernetes" / "listener-deployment.yaml")

    (container,) = _containers(deployment)
    args = parse_listener_args(container["args"])

    assert (deployment["apiVersion"], deployment["kind"]) == ("apps/v1", "Deployment")
    assert args.verb == "run"
    assert container["ports"][0]["containerPort"] == args.metrics_port
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > args.shutdown_grace
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("path", sorted((ROOT / "deploy").rglob("*")))
def test_deploy_files_name_no_password(path: Path) -> None:
    if path.is_dir():
        return
    assert not re.search(r"postgresql://[^:@/\s]+:[^@\s]+@", path.read_text())
