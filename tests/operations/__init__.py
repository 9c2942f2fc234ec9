"""The job under a real daemon and webserver, with Postgres run storage, driven through GraphQL.

Touches: the repo's dagster.yaml (run queue limit, run monitoring, run retries), the advisory
lock (locking.py), the sensors (sensors.py), cooperative cancellation (op_runner.py) and the
whole job on a seeded app database. Each module here has one stack of its own (conftest.py),
so ``./run test``'s workers run the two side by side; each test reseeds the app database.
Timings are printed (run pytest with -s).

This file holds what the tests share.
"""

from __future__ import annotations

from typing import Any

import psycopg

from tests import data, model, pg
from tests.stack import Stack, instance, wait_for

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


def cutoff_tag(run: dict[str, Any]) -> str:
    """The cutoff a run used (its session_cleanup/cutoff tag, from the GraphQL run)."""
    return str(next(t["value"] for t in run["tags"] if t["key"] == "session_cleanup/cutoff"))
