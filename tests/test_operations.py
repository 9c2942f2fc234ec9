"""The job under a real daemon and webserver, with Postgres run storage, driven through GraphQL.

Touches: the repo's dagster.yaml (run queue limit, run monitoring, run retries), the advisory
lock (locking.py), the sensors (sensors.py), cooperative cancellation (op_runner.py) and the
whole job on a seeded app database. One stack serves the whole module (starting one takes
about 15 s); each test reseeds the app database. Timings are printed (run pytest with -s).
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest

from session_cleanup_dagster import locking
from tests import data, model, pg
from tests.data import T
from tests.stack import (
    BIN,
    REPO,
    AlertServer,
    Stack,
    dagster_home,
    instance,
    running_stack,
    wait_for,
    worker_pid,
)

PARTITION = "2026-11-27"  # its window ends at T
DONE = {"SUCCESS", "FAILURE", "CANCELED"}
# Batches of 1 make expire_sessions take a while (each batch is its own transaction): on
# 2,000 seeded users (1,500 due) seconds even on a fast machine, long enough to kill or
# interrupt it half-way.
SLOW = {"expire_sessions": {"batch_size": 1}}


def reseed(url: str, users: int) -> pg.Snapshot:
    pg.execute(
        url,
        "TRUNCATE users, after_hours_sessions, after_hours_declines, device_fingerprints CASCADE",
    )
    return data.seed(url, users)


def assert_partly_cleaned(before: pg.Snapshot, after: pg.Snapshot, cutoff: Any) -> int:
    """Every row is as before or as the contract leaves it; nothing else. Returns changes."""
    final = model.cleanup(before, cutoff)
    changed = 0
    for table in pg.TABLES:
        b = {r["id"]: r for r in before[table]}
        f = {r["id"]: r for r in final[table]}
        a = {r["id"]: r for r in after[table]}
        assert set(a) <= set(b), f"{table}: rows appeared"
        assert set(b) - set(a) <= set(b) - set(f), f"{table}: a row the contract keeps is gone"
        for key, row in a.items():
            assert row == b[key] or row == f.get(key), f"{table}: row {key} changed wrongly"
        changed += len(set(b) - set(a)) + sum(1 for k, r in a.items() if r != b[k])
    return changed


def ended_sessions(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM after_hours_sessions WHERE ended_at IS NOT NULL"
        ).fetchone()
    return int(row[0]) if row else 0


def wait_until_working(stack: Stack, run_id: str, url: str, before: pg.Snapshot) -> None:
    """Until the run is STARTED and has committed some batches."""
    start = sum(1 for r in before["after_hours_sessions"] if r["ended_at"] is not None)
    stack.wait_status(run_id, {"STARTED"} | DONE, timeout=60)
    wait_for("committed batches", lambda: ended_sessions(url) >= start + 15, 60, interval=0.05)
    assert stack.status(run_id) == "STARTED"


def assert_stopped_mid_step(
    env: dict[str, str], run_id: str, step: str = "expire_sessions"
) -> None:
    """The run ended while ``step`` was running: the interruption hit what it was meant to."""
    with instance(env) as inst:
        kinds = [
            (e.step_key, e.dagster_event_type.value)
            for e in inst.all_logs(run_id)
            if e.dagster_event_type
        ]
    assert (step, "STEP_START") in kinds, kinds
    assert (step, "STEP_SUCCESS") not in kinds, f"{step} had finished: {kinds}"


def failure_text(inst: Any, run_id: str) -> str:
    """Every step failure's message with its causes, as the UI shows them."""
    parts = []
    for entry in inst.all_logs(run_id):
        if entry.dagster_event_type and entry.dagster_event_type.value == "STEP_FAILURE":
            error = entry.dagster_event.event_specific_data.error
            while error is not None:
                parts.append(error.message)
                error = error.cause
    return "\n".join(parts)


def retries_of(stack: Stack, run_id: str) -> list[dict[str, Any]]:
    """Runs re-executing ``run_id`` (automatic retries), oldest first."""
    return sorted(
        (r for r in stack.runs() if r["rootRunId"] == run_id), key=lambda r: r["startTime"] or 0
    )


def wait_for_retry(stack: Stack, env: dict[str, str], run_id: str) -> list[dict[str, Any]]:
    """The automatic retries of ``run_id``, once there is one; if none comes, why not.

    The daemon decides (the run's ``dagster/will_retry`` tag) and says why it did not retry in
    an engine event of the run, or in its own log: a timeout shows all three.
    """
    try:
        return list(wait_for("a retry run", lambda: retries_of(stack, run_id), 60))
    except AssertionError as exc:
        with instance(env) as inst:
            run = inst.get_run_by_id(run_id)
            tags = {k: v for k, v in (run.tags if run else {}).items() if k.startswith("dagster/")}
            said = [e.message for e in inst.all_logs(run_id) if "retr" in (e.message or "").lower()]
        daemon = [line for line in stack.log_text().splitlines() if "retr" in line.lower()]
        raise AssertionError(
            f"{exc}; run tags {tags}; the run's log on retries {said}; the daemon's {daemon[-20:]}"
        ) from exc


@pytest.fixture(scope="module")
def alerts() -> Iterator[AlertServer]:
    server = AlertServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def env(admin_url: str, alerts: AlertServer) -> Iterator[dict[str, str]]:
    with pg.scratch_database(admin_url) as storage_url, pg.scratch_database(admin_url) as app_url:
        pg.create_schema(app_url)
        yield {
            **os.environ,
            "DAGSTER_PG_URL": storage_url,
            "APP_DATABASE_URL": app_url,
            "SESSION_CLEANUP_SENSOR_INTERVAL_S": "2",
            "SESSION_CLEANUP_STUCK_RUN_GRACE_S": "8",
            "SESSION_CLEANUP_ALERT_WEBHOOK_URL": alerts.url,
        }


@pytest.fixture(scope="module")
def stack(env: dict[str, str]) -> Iterator[Stack]:
    with dagster_home(env) as home, running_stack(env, home) as running:
        yield running


@pytest.fixture
def app_url(env: dict[str, str]) -> str:
    return env["APP_DATABASE_URL"]


def test_terminate_mid_batch_cancels_within_5_s_and_a_rerun_finishes(
    stack: Stack, app_url: str
) -> None:
    before = reseed(app_url, 400)
    run_id = stack.submit(partition=PARTITION, per_op=SLOW)
    wait_until_working(stack, run_id, app_url, before)
    asked = time.monotonic()
    stack.terminate(run_id)
    assert stack.wait_status(run_id, DONE, timeout=30) == "CANCELED"
    took = time.monotonic() - asked
    print(f"\n[timing] terminate -> CANCELED: {took:.2f} s")
    if took >= 5:
        with instance(stack.env) as inst:
            for e in inst.all_logs(run_id)[-40:]:
                print(e.timestamp, e.dagster_event_type, (e.message or "")[:300])
        print(stack.log_text()[-5000:])
    assert took < 5
    after = pg.snapshot(app_url)
    changed = assert_partly_cleaned(before, after, T)
    assert 0 < changed < len(model.cleanup(before, T)["after_hours_sessions"]) * 10
    time.sleep(1.5)
    assert pg.snapshot(app_url) == after, "a batch ran after the run was CANCELED"
    with psycopg.connect(app_url) as conn:
        assert not locking.holders(conn), "the canceled run still holds the lock"

    rerun = stack.submit(partition=PARTITION)
    assert stack.wait_status(rerun, DONE) == "SUCCESS"
    assert pg.snapshot(app_url) == model.cleanup(before, T)
    assert retries_of(stack, run_id) == [], "the canceled run was retried"


def test_sigkill_of_the_run_worker_fails_the_run_and_a_retry_finishes_with_its_cutoff(
    stack: Stack, env: dict[str, str], app_url: str
) -> None:
    """Unpartitioned: T is the database's now() at start, kept in a run tag the retry copies."""
    before = reseed(app_url, 2000)
    with instance(env) as inst:
        run_id = stack.submit(per_op=SLOW)
        wait_until_working(stack, run_id, app_url, before)
        os.kill(worker_pid(inst, run_id), signal.SIGKILL)
        killed = time.monotonic()
    assert stack.wait_status(run_id, DONE, timeout=60) == "FAILURE"
    assert_stopped_mid_step(env, run_id)
    print(f"\n[timing] worker SIGKILL -> run FAILURE: {time.monotonic() - killed:.2f} s")
    retry = wait_for_retry(stack, env, run_id)
    assert stack.wait_status(retry[0]["runId"], DONE, timeout=120) == "SUCCESS"
    runs = {r["runId"]: r for r in stack.runs()}
    cutoff = _cutoff(runs[run_id])
    assert _cutoff(runs[retry[0]["runId"]]) == cutoff
    assert pg.snapshot(app_url) == model.cleanup(before, datetime.fromisoformat(cutoff))


def test_whole_stack_killed_mid_run_is_failed_by_the_sensor_then_retried(
    stack: Stack, env: dict[str, str], app_url: str
) -> None:
    before = reseed(app_url, 2000)
    run_id = stack.submit(partition=PARTITION, per_op=SLOW)
    wait_until_working(stack, run_id, app_url, before)
    stack.kill()
    assert_partly_cleaned(before, pg.snapshot(app_url), T)
    assert_stopped_mid_step(env, run_id)
    with instance(env) as inst:
        run = inst.get_run_by_id(run_id)
        assert run is not None and run.status.value == "STARTED"  # nobody left to notice
    restarted = time.monotonic()
    stack.start()
    up = time.monotonic()
    assert stack.wait_status(run_id, DONE, timeout=120) == "FAILURE"
    detected = time.monotonic()
    print(
        f"\n[timing] stack restart took {up - restarted:.1f} s; stuck run failed "
        f"{detected - up:.1f} s after the stack was up"
    )
    retry = wait_for_retry(stack, env, run_id)
    assert stack.wait_status(retry[0]["runId"], DONE, timeout=120) == "SUCCESS"
    assert pg.snapshot(app_url) == model.cleanup(before, T)
    with instance(env) as inst:
        messages = [e.message or "" for e in inst.all_logs(run_id)]
    assert any("Run worker gone" in m for m in messages)


def test_dry_run_killed_with_the_stack_is_failed_by_the_sensor_and_frees_the_run_slot(
    stack: Stack, env: dict[str, str], app_url: str
) -> None:
    """A dry run holds the one run slot too: once its worker is gone, the nightly run goes on.

    The whole stack dies (code server too): nobody is left to notice but the sensor.
    """
    before = reseed(app_url, 2000)
    dry = stack.submit(job="session_cleanup_dry_run_job", job_config={"batch_size": 1})
    stack.wait_status(dry, {"STARTED"} | DONE, timeout=60)
    with psycopg.connect(app_url, autocommit=True) as conn:
        wait_for("the dry run to hold the cleanup lock", lambda: locking.holders(conn), 60)
    stack.kill()
    with instance(env) as inst:
        run = inst.get_run_by_id(dry)
        assert run is not None and run.status.value == "STARTED"  # nobody left to notice
    stack.start()
    nightly = stack.submit(partition=PARTITION)
    assert stack.wait_status(dry, DONE, timeout=120) == "FAILURE"
    assert stack.wait_status(nightly, DONE, timeout=180) == "SUCCESS"
    assert pg.snapshot(app_url) == model.cleanup(before, T)
    with instance(env) as inst:
        messages = [e.message or "" for e in inst.all_logs(dry)]
    assert any("Run worker gone" in m for m in messages), "\n".join(messages[-6:])


def test_connections_killed_mid_run_are_survived_and_the_run_succeeds(
    stack: Stack, env: dict[str, str], app_url: str
) -> None:
    before = reseed(app_url, 400)
    run_id = stack.submit(partition=PARTITION, per_op=SLOW)
    wait_until_working(stack, run_id, app_url, before)
    with psycopg.connect(app_url, autocommit=True) as conn:
        # Catch the batch connection inside a transaction, so the batch itself is cut off.
        killed = wait_for(
            "a batch in progress to terminate",
            lambda: conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = %s"
                # Not the pool's pre-ping (SELECT 1), which would just reconnect quietly.
                " AND (state = 'idle in transaction'"
                "      OR (state = 'active' AND query NOT ILIKE 'select 1%%'))",
                ("session-cleanup-dagster",),
            ).fetchall(),
            30,
            interval=0.01,
        )
        lock_killed = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (locking.application_name(run_id),),
        ).fetchall()
    assert killed and lock_killed
    assert stack.wait_status(run_id, DONE, timeout=120) == "SUCCESS"
    assert pg.snapshot(app_url) == model.cleanup(before, T)
    with instance(env) as inst:
        retried = [
            e
            for e in inst.all_logs(run_id)
            if e.dagster_event_type and e.dagster_event_type.value == "STEP_UP_FOR_RETRY"
        ]
    # Usually the batch fails and the op retries; when the kill lands on the pool's pre-ping
    # instead, SQLAlchemy reconnects without an error. Either way the run must succeed.
    print(f"\n[info] op retries after the kill: {len(retried)}")


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


def _cutoff(run: dict[str, Any]) -> str:
    return str(next(t["value"] for t in run["tags"] if t["key"] == "session_cleanup/cutoff"))


def _partition(run: dict[str, Any]) -> str:
    return str(next(t["value"] for t in run["tags"] if t["key"] == "dagster/partition"))


def _assert_each_partition_used_its_cutoff(runs: list[dict[str, Any]], days: list[str]) -> None:
    assert sorted(_partition(r) for r in runs) == days
    for run in runs:
        assert run["status"] == "SUCCESS"
        day = _partition(run)
        expected = (T.replace(day=int(day[-2:])) + timedelta(days=1)).isoformat()
        assert _cutoff(run) == expected


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

    ui_runs = wait_for(
        "3 finished UI backfill runs", lambda: finished("dagster/backfill", backfill), 240, 0.5
    )
    cli_runs = wait_for(
        "3 finished CLI backfill runs", lambda: finished("test", "cli-backfill"), 240, 0.5
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
