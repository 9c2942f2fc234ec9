"""Dagster's own tools from the root of the checkout, as a new user runs them.

Touches: the root dagster.yaml (the development instance) against deploy/dagster.yaml (the
production one), pyproject's [tool.dg], `dagster dev` and `dg dev` as real processes (webserver,
daemon, code server, run worker), `dg check defs`, `dg list defs`, `dg launch`, the app_db
resource without APP_DATABASE_URL, and the stuck-run sensor's skip without it.
Nothing is set but PATH and VIRTUAL_ENV: no DAGSTER_HOME, DAGSTER_PG_URL or APP_DATABASE_URL.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from session_cleanup_dev.webserver import Webserver

from session_cleanup_dagster.resources import MISSING_URL
from tests import data, model, pg
from tests.data import T
from tests.stack import BIN, JOB, REPO, free_port, stop_group, wait_for

pytestmark = pytest.mark.slow  # ./run test starts the long modules first

UNSET = ("DAGSTER_HOME", "DAGSTER_PG_URL", "APP_DATABASE_URL", "SESSION_CLEANUP_START_DATE")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    # As after `source .venv/bin/activate`: dg compares it with the project's venv.
    env["VIRTUAL_ENV"] = str(BIN.parent)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def _dg(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "dg"), *args],
        cwd=REPO,
        env=env or _clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_dev_instance_is_the_production_instance_without_its_postgres_storage() -> None:
    production = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())
    development = yaml.safe_load((REPO / "dagster.yaml").read_text())
    assert "postgres" in production.pop("storage")
    assert development == production


def test_dg_check_defs_passes_from_the_repo_root() -> None:
    done = _dg("check", "defs")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "All definitions loaded successfully." in done.stdout + done.stderr
    assert "warning" not in done.stderr.lower(), done.stderr


def test_dg_list_defs_lists_the_job_schedule_sensors_and_tables() -> None:
    done = _dg("list", "defs", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    listed = json.loads(done.stdout)
    names = {
        kind: sorted(d.get("name") or d.get("asset_key") for d in defs)
        for kind, defs in listed.items()
    }
    assert names == {
        "assets": [
            "app_database/after_hours_declines",
            "app_database/after_hours_sessions",
            "app_database/device_fingerprints",
        ],
        "asset_checks": [
            "no_declines_past_retention",
            "no_old_orphan_fingerprints",
            "no_overdue_open_sessions",
        ],
        "jobs": ["session_cleanup_checks_job", "session_cleanup_dry_run_job", JOB],
        "resources": ["app_db"],
        "schedules": ["session_cleanup_schedule"],
        "sensors": [
            "session_cleanup_checks_after_failure",
            "session_cleanup_checks_after_success",
            "session_cleanup_failure_alert",
            "session_cleanup_staleness_alert",
            "session_cleanup_stuck_run_sensor",
        ],
    }


def test_dg_launch_runs_the_job_with_config_exactly_as_the_contract_says(app_url: str) -> None:
    before = data.seed(app_url, 300)
    config = {"ops": {"expire_sessions": {"config": {"batch_size": 50}}}}
    done = _dg(
        "launch",
        "--job",
        JOB,
        "--partition",
        "2026-11-27",
        "--config-json",
        json.dumps(config),
        env=_clean_env(APP_DATABASE_URL=app_url),
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "RUN_SUCCESS" in done.stdout + done.stderr
    assert pg.snapshot(app_url) == model.cleanup(before, T)


def test_dg_launch_without_app_database_url_fails_at_once_naming_it() -> None:
    done = _dg("launch", "--job", JOB, "--partition", "2026-11-27")
    assert done.returncode != 0
    out = done.stdout + done.stderr
    # Each op fails on it at once, without a retry (a retry would fail the same way).
    for op in ("expire_sessions", "purge_declines", "remove_orphan_fingerprints"):
        failed = rf"{op} - STEP_FAILURE - .*\n\n.*Failure: {re.escape(MISSING_URL)}\n"
        assert re.search(failed, out), out[-3000:]
    assert "STEP_UP_FOR_RETRY" not in out


def _default_sigint() -> None:
    # As from a terminal. A suite started in the background (a CI runner, `cmd &`) inherits
    # SIGINT ignored, and so would dagster dev, which then ignores our Ctrl-C below.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def _dev_command(command: list[str], log: Path) -> Iterator[Webserver]:
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*command, "-p", str(port)],
            cwd=REPO,
            env=_clean_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_default_sigint,
        )
    try:
        webserver = Webserver("127.0.0.1", port)
        wait_for(
            f"{command[0]} to serve the code location",
            lambda: proc.poll() is None and webserver.not_ready() is None,
            240,
            interval=0.5,
        )
        yield webserver
    finally:
        # SIGINT, as a Ctrl-C in the terminal: dagster dev removes its temporary home.
        stop_group(proc, signal.SIGINT, timeout=60)


@pytest.mark.parametrize("command", ["dagster dev", "dg dev"])
def test_dev_command_serves_the_code_location_and_a_run_without_a_url_fails_in_one_line(
    command: str, tmp_path: Path
) -> None:
    executable, sub = command.split()
    log = tmp_path / "dev.log"
    with _dev_command([str(BIN / executable), sub], log) as webserver:
        # The sensors' first ticks happen at daemon start: they must skip, not fail.
        wait_for(
            "the stuck-run sensor's first tick",
            lambda: _sensor_ticks(webserver, "session_cleanup_stuck_run_sensor"),
            120,
            interval=1.0,
        )
        run_id = webserver.client.submit_job_execution(
            JOB,
            run_config={},
            tags={"dagster/partition": "2026-11-27"},
        )
        wait_for(
            "the run to fail",
            lambda: webserver.client.get_run_status(run_id).value == "FAILURE",
            120,
            interval=0.5,
        )
        messages = _error_messages(webserver, run_id)
        ticks = _sensor_ticks(webserver, "session_cleanup_stuck_run_sensor")
    text = log.read_text(errors="replace")
    assert "All component YAML validated successfully." in text or "Launching Dagster" in text
    before_launch = text.split("RUN_START")[0] if "RUN_START" in text else text
    assert "Traceback" not in before_launch, before_launch[-4000:]
    assert not re.search(r" - (WARNING|ERROR) - ", before_launch), before_launch[-4000:]
    # The failure's first line is ours, whole; Dagster puts its stack below it.
    assert any(MISSING_URL in m.splitlines()[0] for m in messages), messages
    assert ticks and all(t["status"] == "SKIPPED" and not t["error"] for t in ticks), ticks
    home = re.search(r"Using temporary directory (\S+) for storage", text)
    assert home and not Path(home[1]).exists(), "its temporary DAGSTER_HOME was left behind"


def _sensor_ticks(webserver: Webserver, name: str) -> list[dict[str, str | None]]:
    data_ = webserver.query(
        """query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) {
             ... on Sensor { sensorState { ticks(limit: 10) { status skipReason error {
               message } } } } } }""",
        {
            "s": {
                "repositoryLocationName": "session_cleanup_dagster",
                "repositoryName": "__repository__",
                "sensorName": name,
            }
        },
    )
    return list(data_["sensorOrError"]["sensorState"]["ticks"])


def _error_messages(webserver: Webserver, run_id: str) -> list[str]:
    data_ = webserver.query(
        """query($id: ID!) { logsForRun(runId: $id) { ... on EventConnection { events {
             __typename ... on ErrorEvent { error { message } } } } } }""",
        {"id": run_id},
    )
    events = data_["logsForRun"]["events"]
    return [e["error"]["message"] for e in events if e.get("error")]
