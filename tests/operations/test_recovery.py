"""Crashes and interruptions mid-run: terminate, SIGKILL, the whole stack, connections."""

from __future__ import annotations

import os
import signal
import time
from datetime import datetime

import psycopg
import pytest

from session_cleanup_dagster import locking
from tests import model, pg
from tests.data import T
from tests.operations import (
    DONE,
    PARTITION,
    SLOW,
    assert_partly_cleaned,
    assert_stopped_mid_step,
    cutoff_tag,
    reseed,
    retries_of,
    wait_for_retry,
    wait_until_working,
)
from tests.stack import Stack, instance, wait_for, worker_pid

pytestmark = pytest.mark.slow  # ./run test starts the long modules first


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
    cutoff = cutoff_tag(runs[run_id])
    assert cutoff_tag(runs[retry[0]["runId"]]) == cutoff
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
