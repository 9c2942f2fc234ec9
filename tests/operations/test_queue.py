"""The run queue, the lock, retries, backfills and alerts, through the stack."""

from __future__ import annotations

import itertools
import socket
import subprocess
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from session_cleanup_dagster import locking
from tests import model, pg
from tests.data import T
from tests.operations import (
    DONE,
    PARTITION,
    SLOW,
    cutoff_tag,
    failure_text,
    reseed,
)
from tests.stack import BIN, REPO, AlertServer, Stack, instance, wait_for

pytestmark = pytest.mark.slow  # ./run test starts the long modules first


def test_app_database_down_at_start_retries_with_backoff_then_fails_clearly(
    stack: Stack, env: dict[str, str], app_url: str, alerts: AlertServer
) -> None:
    before = reseed(app_url, 200)
    # A host that takes the connection but never answers, as a database host that is down
    # behind a firewall: every attempt waits out connect_timeout_s (2 s). Twelve attempts
    # (three ops, each retried three times) plus the backoff last longer than the stuck-run
    # sensor's two looks (2 x its 8 s grace) at a run without a connection to the app
    # database. It must see the retries' events and leave the run alone.
    silent = socket.create_server(("127.0.0.1", 0), backlog=0)
    down = f"postgresql://cleanup:hunter2@127.0.0.1:{silent.getsockname()[1]}/app"
    with silent:
        run_id = stack.submit(partition=PARTITION, resources={"url": down, "connect_timeout_s": 2})
        assert stack.wait_status(run_id, DONE, timeout=240) == "FAILURE"
    assert stack.ready(), "the code location must stay loaded"
    with instance(env) as inst:
        events = [e for e in inst.all_logs(run_id) if e.dagster_event_type]
        text = failure_text(inst, run_id)
        run = inst.get_run_by_id(run_id)
        record = inst.get_run_record_by_id(run_id)
    assert record is not None and record.start_time and record.end_time
    assert record.end_time - record.start_time > 2 * 8 + 2, "the sensor had no time to judge"
    kinds = [(e.step_key, e.dagster_event_type.value, e.timestamp) for e in events]  # type: ignore[union-attr]
    messages = "\n".join(e.message or "" for e in events)
    assert "Run worker gone" not in messages, kinds
    for op in ("expire_sessions", "purge_declines", "remove_orphan_fingerprints"):
        ups = [when for step, kind, when in kinds if (step, kind) == (op, "STEP_UP_FOR_RETRY")]
        restarts = [when for step, kind, when in kinds if (step, kind) == (op, "STEP_RESTARTED")]
        assert len(ups) == len(restarts) == 3, kinds
        # The default backoff: 2, 4, 8 s, each with +-50 % jitter.
        waits = [b - a for a, b in zip(ups, restarts, strict=True)]
        print(f"\n[timing] {op} retry waits: {', '.join(f'{w:.1f}' for w in waits)} s")
        assert all(w >= 0.9 * 2**i for i, w in enumerate(waits)), waits
    assert text.count("Exceeded max_retries of 3") == 3
    assert "timeout expired" in text.lower() and "127.0.0.1:" in text
    assert "usually temporary" in text
    assert "hunter2" not in text
    assert run is not None and run.tags.get("dagster/will_retry") == "false"
    assert pg.snapshot(app_url) == before
    wait_for("the failure alert", lambda: any(run_id in t for t in alerts.texts()), 30)
    alert = next(t for t in alerts.texts() if run_id in t)
    assert "session_cleanup_job failed" in alert and "will not be retried" in alert
    assert "hunter2" not in alert


def test_two_launches_never_overlap_and_an_outside_lock_holder_fails_the_run_plainly(
    stack: Stack, env: dict[str, str], app_url: str
) -> None:
    before = reseed(app_url, 400)
    first = stack.submit(op_config={"as_of": "2026-11-28T04:00:00Z"}, per_op=SLOW)
    second = stack.submit(op_config={"as_of": "2026-11-28T04:00:00Z"})
    assert stack.wait_status(first, DONE, timeout=120) == "SUCCESS"
    assert stack.wait_status(second, DONE, timeout=120) == "SUCCESS"
    runs = {r["runId"]: r for r in stack.runs()}
    a, b = sorted((runs[first], runs[second]), key=lambda r: r["startTime"])
    assert b["startTime"] >= a["endTime"], "two cleanup runs overlapped"
    assert pg.snapshot(app_url) == model.cleanup(before, T)

    # Another deployment (or a run outside the queue) holds the lock: the run waits its
    # lock_wait_s, then fails saying who holds it, having changed nothing; not retried.
    before = reseed(app_url, 200)
    with psycopg.connect(app_url, autocommit=True, application_name="other deployment") as other:
        other.execute("SELECT pg_advisory_lock(%s)", (locking.LOCK_KEY,))
        run_id = stack.submit(partition=PARTITION, resources={"lock_wait_s": 2})
        assert stack.wait_status(run_id, DONE, timeout=120) == "FAILURE"
    assert pg.snapshot(app_url) == before
    with instance(env) as inst:
        text = failure_text(inst, run_id)
        run = inst.get_run_by_id(run_id)
    assert "holds the cleanup lock" in text and "'other deployment'" in text
    assert "changed nothing" in text
    assert run is not None and run.tags.get("dagster/will_retry") == "false"


def _backfill_runs(stack: Stack, key: str, value: str) -> list[dict[str, Any]]:
    return [r for r in stack.runs() if {"key": key, "value": value} in r["tags"]]


def _partition(run: dict[str, Any]) -> str:
    return str(next(t["value"] for t in run["tags"] if t["key"] == "dagster/partition"))


def _assert_each_partition_used_its_cutoff(runs: list[dict[str, Any]], days: list[str]) -> None:
    assert sorted(_partition(r) for r in runs) == days
    for run in runs:
        assert run["status"] == "SUCCESS"
        day = _partition(run)
        expected = (T.replace(day=int(day[-2:])) + timedelta(days=1)).isoformat()
        assert cutoff_tag(run) == expected


def test_backfill_of_three_partitions_through_graphql_and_the_cli(
    stack: Stack, env: dict[str, str], app_url: str
) -> None:
    before = reseed(app_url, 200)
    ui_days = ["2026-11-25", "2026-11-26", "2026-11-27"]
    cli_days = ["2026-11-22", "2026-11-23", "2026-11-24"]
    # Both launched at once: the backfill daemon (every 30 s) picks both up in one pass.
    data = stack.graphql(
        """mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
             __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message }
           } }""",
        {
            "p": {
                "selector": {
                    "partitionSetName": "session_cleanup_job_partition_set",
                    "repositorySelector": {
                        "repositoryLocationName": "session_cleanup_dagster",
                        "repositoryName": "__repository__",
                    },
                },
                "partitionNames": ui_days,
            }
        },
    )
    result = data["launchPartitionBackfill"]
    assert result["__typename"] == "LaunchBackfillSuccess", result
    backfill = result["backfillId"]
    command = [str(BIN / "dagster"), "job", "backfill", "-w", str(REPO / "workspace.yaml")]
    command += ["-j", "session_cleanup_job", "--from", cli_days[0], "--to", cli_days[-1]]
    command += ["--noprompt", "--tags", '{"test": "cli-backfill"}']
    done = subprocess.run(
        command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr

    def finished(key: str, value: str) -> list[dict[str, Any]]:
        runs = _backfill_runs(stack, key, value)
        return runs if len(runs) == 3 and all(r["status"] in DONE for r in runs) else []

    # Six runs, one at a time, each a fresh run worker: 44 s on a quiet machine, 210 s beside
    # two other test processes (./run test). The limits leave room above that.
    ui_runs = wait_for(
        "3 finished UI backfill runs", lambda: finished("dagster/backfill", backfill), 420, 0.5
    )
    cli_runs = wait_for(
        "3 finished CLI backfill runs", lambda: finished("test", "cli-backfill"), 420, 0.5
    )
    _assert_each_partition_used_its_cutoff(ui_runs, ui_days)
    _assert_each_partition_used_its_cutoff(cli_runs, cli_days)
    assert pg.snapshot(app_url) == model.cleanup(before, T)
    ordered = sorted(ui_runs + cli_runs, key=lambda r: r["startTime"])
    for earlier, later in itertools.pairwise(ordered):
        assert later["startTime"] >= earlier["endTime"], "backfill runs overlapped"


def test_staleness_alert_fires_when_the_last_success_is_over_26_h_ago(
    stack: Stack, env: dict[str, str], alerts: AlertServer
) -> None:
    assert not any(":warning:" in t for t in alerts.texts())
    # Age the whole run history by 27 hours, as if the daemon had been down since.
    shift = 27 * 3600
    pg.execute(
        env["DAGSTER_PG_URL"],
        "UPDATE runs SET create_timestamp = create_timestamp - make_interval(secs => %s),"
        " update_timestamp = update_timestamp - make_interval(secs => %s),"
        " start_time = start_time - %s, end_time = end_time - %s",
        (shift, shift, shift, shift),
    )
    wait_for("the staleness alert", lambda: any(":warning:" in t for t in alerts.texts()), 30)
    alert = next(t for t in alerts.texts() if ":warning:" in t)
    assert "has not succeeded for 27" in alert
