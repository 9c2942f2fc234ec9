"""Sensors that keep the nightly cleanup honest: stuck runs, failures, staleness.

- ``session_cleanup_stuck_run_sensor`` fails a STARTED run whose run worker is gone: any run
  that holds the cleanup's run slot (the exclusive tag), the dry-run job's as well. Under
  Dagster's default run launcher, run monitoring cannot see a dead worker (after a SIGKILL of
  the whole stack the run stays STARTED forever). Each run holds a connection named
  ``session-cleanup run <run id>`` to the app database for its whole life (locking.py), so
  "no such connection" means "no worker", unless the run has logged an event lately: a
  worker that cannot reach the database waits between retries (op_runner.py) and logs each
  one. The run is then marked failed and run_retries re-runs it.
- ``session_cleanup_failure_alert`` posts every failed run to a webhook.
- ``session_cleanup_staleness_alert`` posts when no cleanup run has succeeded for 26 hours.

Alerts go out through alerts.py (``SESSION_CLEANUP_ALERT_WEBHOOK_URL``, else the sensor's log).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import dagster as dg
import psycopg

from session_cleanup_dagster import locking
from session_cleanup_dagster.alerts import WEBHOOK_ENV, post_alert
from session_cleanup_dagster.assets import STALE_AFTER
from session_cleanup_dagster.cutoff import CUTOFF_TAG
from session_cleanup_dagster.errors import ConfigError
from session_cleanup_dagster.jobs import EXCLUSIVE_TAG
from session_cleanup_dagster.resources import AppDatabase

INTERVAL_ENV = "SESSION_CLEANUP_SENSOR_INTERVAL_S"
GRACE_ENV = "SESSION_CLEANUP_STUCK_RUN_GRACE_S"
STALE_AFTER_S = STALE_AFTER.total_seconds()
# While stale, repeat the alert once a day rather than on every tick.
STALE_REPEAT_S = 24 * 3600
WILL_RETRY_TAG = "dagster/will_retry"
PARTITION_TAG = "dagster/partition"


def _env_seconds(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name}={value!r} is not a whole number of seconds (1 or more).")
    return int(value)


def interval_s(default: int) -> int:
    """A sensor's interval: ``SESSION_CLEANUP_SENSOR_INTERVAL_S`` when set (tests, dev)."""
    return _env_seconds(INTERVAL_ENV, default)


def stuck_grace_s() -> int:
    """How long a run may be without a worker connection before it is declared dead."""
    return _env_seconds(GRACE_ENV, 60)


def _describe_run(run: dg.DagsterRun) -> str:
    where = run.tags.get(PARTITION_TAG) or run.tags.get(CUTOFF_TAG) or "no cutoff yet"
    return f"run {run.run_id} ({where})"


def _last_event_time(context: dg.SensorEvaluationContext, run_id: str, started: float) -> float:
    """When the run last logged an event (its start, if it has logged none since)."""
    latest = context.instance.get_records_for_run(run_id, limit=1, ascending=False).records
    return max([started, *(r.timestamp for r in latest)])


def build_sensors(job: dg.JobDefinition) -> list[dg.SensorDefinition]:
    """The three sensors, running by default."""
    job_name = job.name

    @dg.sensor(
        name="session_cleanup_stuck_run_sensor",
        minimum_interval_seconds=interval_s(30),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Fails a STARTED cleanup or dry run whose run worker is gone (no connection of the "
            "run to the app database and no event for the grace period), so run_retries re-runs "
            "it and the run slot is free again."
        ),
    )
    def session_cleanup_stuck_run_sensor(
        context: dg.SensorEvaluationContext, app_db: AppDatabase
    ) -> dg.SkipReason:
        # Every run that holds the run slot, the dry-run job's too: a dead dry run would
        # otherwise keep every nightly run QUEUED until max_runtime_seconds.
        runs = context.instance.get_run_records(
            dg.RunsFilter(tags={EXCLUSIVE_TAG: "app_db"}, statuses=[dg.DagsterRunStatus.STARTED])
        )
        missing: dict[str, float] = json.loads(context.cursor) if context.cursor else {}
        if not runs:
            context.update_cursor(None)
            return dg.SkipReason("no STARTED cleanup run")
        try:
            alive = locking.live_run_ids(
                app_db.database_url(), connect_timeout_s=app_db.connect_timeout_s
            )
        except ConfigError as exc:
            context.update_cursor(None)
            return dg.SkipReason(f"not judging runs: {exc}")
        except psycopg.Error as exc:
            # Without the database we cannot tell a dead worker from a cut-off one: judge
            # nothing, and start over once the database answers.
            context.update_cursor(None)
            return dg.SkipReason(
                f"app database unreachable, not judging runs: {type(exc).__name__}"
            )
        grace = stuck_grace_s()
        now = time.time()
        judged: dict[str, float] = {}
        failed: list[str] = []
        for record in runs:
            run = record.dagster_run
            started = record.start_time or record.create_timestamp.timestamp()
            if run.run_id in alive:
                continue
            # A worker waiting to retry (op_runner.py) has no connection but logs every retry.
            quiet = now - _last_event_time(context, run.run_id, started)
            if quiet < grace:
                continue
            # Two looks at least `grace` apart: a worker reconnecting after a database restart
            # is briefly without its connection.
            first = missing.get(run.run_id, now)
            judged[run.run_id] = first
            if now - first < grace:
                continue
            message = (
                f"Run worker gone: {_describe_run(run)} is STARTED but has had no connection "
                f"'{locking.application_name(run.run_id)}' to the app database for "
                f"{now - first:.0f} s, and has logged no event for {quiet:.0f} s (killed "
                "worker or stack). Marking it failed so that run_retries re-runs it; every "
                "committed batch is complete."
            )
            context.log.warning("%s", message)
            context.instance.report_run_failed(run, message)
            failed.append(run.run_id)
            del judged[run.run_id]
        context.update_cursor(json.dumps(judged) if judged else None)
        if failed:
            return dg.SkipReason(f"marked failed (worker gone): {', '.join(failed)}")
        return dg.SkipReason(f"{len(runs)} STARTED run(s), worker(s) alive or within grace")

    @dg.run_failure_sensor(
        name="session_cleanup_failure_alert",
        monitored_jobs=[job],
        minimum_interval_seconds=interval_s(30),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Posts every failed cleanup run to ${WEBHOOK_ENV} (or logs it).",
    )
    def session_cleanup_failure_alert(context: dg.RunFailureSensorContext) -> None:
        run = context.instance.get_run_by_id(context.dagster_run.run_id) or context.dagster_run
        retry = run.tags.get(WILL_RETRY_TAG) == "true"
        text = (
            f":rotating_light: session_cleanup_job failed: {_describe_run(run)}.\n"
            f"{context.failure_event.message or 'no message'}\n"
            + (
                "It will be retried automatically."
                if retry
                else "It will not be retried; fix the cause and re-execute it."
            )
        )
        post_alert(text, context.log)

    # Beside the tables' freshness policies (assets.py): those show in the UI but alert
    # nobody in open-source Dagster, and a table never cleaned is "unknown", not stale.
    @dg.sensor(
        name="session_cleanup_staleness_alert",
        minimum_interval_seconds=interval_s(300),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Alerts when no cleanup run has succeeded for 26 hours.",
    )
    def session_cleanup_staleness_alert(context: dg.SensorEvaluationContext) -> dg.SkipReason:
        state: dict[str, float] = json.loads(context.cursor) if context.cursor else {}
        now = time.time()
        # With no success at all, count from when this deployment started: the first run of
        # the job, or this sensor's first tick if that is earlier.
        since = min(state.setdefault("since", now), _first_run_created(context.instance, job_name))
        last = _last_real_success(context.instance, job_name)
        reference = max(last or 0.0, since)
        if now - reference < STALE_AFTER_S:
            state.pop("alerted", None)
            context.update_cursor(json.dumps(state))
            return dg.SkipReason(
                "not stale: last success, or start of watching, less than 26 h ago"
            )
        if now - state.get("alerted", 0.0) < STALE_REPEAT_S:
            context.update_cursor(json.dumps(state))
            return dg.SkipReason("stale; already alerted within 24 h")
        hours = (now - reference) / 3600
        text = (
            f":warning: session_cleanup_job has not succeeded for {hours:.1f} h "
            + (
                f"(last success ended {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(last))})."
                if last
                else "(no successful run since this deployment started watching)."
            )
            + " Expired sessions and old declines are piling up; check the daemon, the "
            "schedule and the last runs."
        )
        post_alert(text, context.log)
        state["alerted"] = now
        context.update_cursor(json.dumps(state))
        return dg.SkipReason("stale: alert sent")

    return [
        session_cleanup_stuck_run_sensor,
        session_cleanup_failure_alert,
        session_cleanup_staleness_alert,
    ]


def _is_dry_run(run_config: Mapping[str, Any]) -> bool:
    ops = run_config.get("ops") or {}
    return any(((op or {}).get("config") or {}).get("dry_run") for op in ops.values())


def _first_run_created(instance: dg.DagsterInstance, job_name: str) -> float:
    records = instance.get_run_records(dg.RunsFilter(job_name=job_name), limit=1, ascending=True)
    return records[0].create_timestamp.timestamp() if records else time.time()


def _last_real_success(instance: dg.DagsterInstance, job_name: str) -> float | None:
    """End time of the newest successful run that was not a dry run."""
    records = instance.get_run_records(
        dg.RunsFilter(job_name=job_name, statuses=[dg.DagsterRunStatus.SUCCESS]),
        # Newest first by creation; a dry run or two among them does not hide a real run.
        limit=50,
    )
    ends = [
        r.end_time or r.update_timestamp.timestamp()
        for r in records
        if not _is_dry_run(r.dagster_run.run_config)
    ]
    return max(ends) if ends else None
