"""The SLO asset checks, their job and the sensors that launch it after the cleanup.

Touches: checks, backlog and the real checks job through execute_in_process on a Dagster test
instance (app_db bound from APP_DATABASE_URL, as in production), on a fresh database per
test. Rows are placed relative to the database clock, since the checks look back from now.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from session_cleanup_dagster import checks
from session_cleanup_dagster.alerts import WEBHOOK_ENV
from session_cleanup_dagster.definitions import defs
from tests import data, pg
from tests.data import DAY, HOUR, uid
from tests.stack import AlertServer

SESSIONS = "app_database__after_hours_sessions_no_overdue_open_sessions"
DECLINES = "app_database__after_hours_declines_no_declines_past_retention"
FINGERPRINTS = "app_database__device_fingerprints_no_old_orphan_fingerprints"


def _dirty(url: str) -> datetime:
    """One offending and one tolerated row per check; returns the reference now."""
    now = datetime.now(UTC)
    for user in ("u1", "u2", "u3"):
        data.insert_user(url, user)
    data.insert_session(url, uid(101), "u1", now - 3 * DAY)  # expired 3 days ago: offends
    data.insert_session(url, uid(102), "u2", now - 2 * HOUR)  # expired 2 hours ago: tolerated
    data.insert_decline(url, uid(201), uid(101), "u1", "u2", now - 9 * DAY)  # offends
    data.insert_decline(url, uid(202), uid(101), "u1", "u3", now - 7 * DAY - 2 * HOUR)
    data.insert_fingerprint(url, uid(301), uid(9001), now - 3 * DAY)  # orphan: offends
    data.insert_fingerprint(url, uid(302), uid(9002), now - 3 * HOUR)  # orphan: tolerated
    data.insert_fingerprint(url, uid(303), uid(101), now - 30 * DAY)  # not an orphan
    return now


def _run_checks(url: str, ops: dict[str, Any] | None = None) -> dict[str, dg.AssetCheckEvaluation]:
    os.environ["APP_DATABASE_URL"] = url  # restored by the autouse fixture
    job = defs.resolve_job_def(checks.CHECKS_JOB)
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(
            run_config={"ops": {op: {"config": cfg} for op, cfg in (ops or {}).items()}},
            instance=instance,
        )
    assert result.success  # a failed check is a result, not a failed run
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_checks_pass_on_a_clean_database(app_url: str) -> None:
    results = _run_checks(app_url)
    assert set(results) == {
        "no_overdue_open_sessions",
        "no_declines_past_retention",
        "no_old_orphan_fingerprints",
    }
    for evaluation in results.values():
        assert evaluation.passed
        assert evaluation.metadata["offending_rows"].value == 0


def test_failing_checks_show_offending_count_and_sample_ids(app_url: str) -> None:
    _dirty(app_url)
    before = pg.snapshot(app_url)
    results = _run_checks(app_url)
    assert pg.snapshot(app_url) == before  # checks only read
    expected = {
        "no_overdue_open_sessions": uid(101),
        "no_declines_past_retention": uid(201),
        "no_old_orphan_fingerprints": uid(301),
    }
    for name, offender in expected.items():
        evaluation = results[name]
        assert not evaluation.passed
        assert evaluation.severity == dg.AssetCheckSeverity.ERROR
        assert evaluation.metadata["offending_rows"].value == 1
        assert evaluation.metadata["sample_ids"].value == str(offender)
        assert evaluation.metadata["exact"].value is True
        assert evaluation.description and evaluation.description.startswith("1 ")


def test_thresholds_and_severity_come_from_config(app_url: str) -> None:
    _dirty(app_url)
    results = _run_checks(
        app_url,
        {
            SESSIONS: {"max_overdue_hours": 24 * 4},  # 3 days overdue is now tolerated
            DECLINES: {"severity": "WARN", "retention_days": 10},
            FINGERPRINTS: {"allowed_rows": 1},
        },
    )
    assert results["no_overdue_open_sessions"].passed
    assert results["no_declines_past_retention"].passed
    assert results["no_old_orphan_fingerprints"].passed
    results = _run_checks(app_url, {DECLINES: {"severity": "WARN", "slack_hours": 1}})
    evaluation = results["no_declines_past_retention"]
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN
    assert evaluation.metadata["offending_rows"].value == 2  # slack 1 h also catches 7 d 2 h


def test_a_failed_error_check_alerts_once_naming_table_count_and_cutoff(app_url: str) -> None:
    _dirty(app_url)
    server = AlertServer()
    try:
        os.environ[WEBHOOK_ENV] = server.url
        results = _run_checks(app_url, {DECLINES: {"severity": "WARN"}})
        texts = server.texts()
    finally:
        server.close()
    # Two ERROR checks failed and alerted once each; the failed WARN check did not alert.
    assert len(texts) == 2, texts
    for name, table in [
        ("no_overdue_open_sessions", "public.after_hours_sessions"),
        ("no_old_orphan_fingerprints", "public.device_fingerprints"),
    ]:
        metadata = results[name].metadata
        assert metadata["alert"].value == "posted"
        timestamp = metadata["cutoff"].value
        assert isinstance(timestamp, float)
        cutoff = datetime.fromtimestamp(timestamp, UTC).isoformat()
        [text] = [text for text in texts if f"SLO check {name} failed" in text]
        assert f"on {table}: 1 " in text
        assert f"cutoff {cutoff}" in text
    assert results["no_declines_past_retention"].metadata["alert"].value == "not needed"
    # A passing check never alerts.
    server = AlertServer()
    try:
        os.environ[WEBHOOK_ENV] = server.url
        results = _run_checks(
            app_url, {SESSIONS: {"allowed_rows": 1}, DECLINES: {"allowed_rows": 1}}
        )
        assert results["no_overdue_open_sessions"].passed
        assert [t for t in server.texts() if "no_overdue_open_sessions" in t] == []
    finally:
        server.close()


def test_large_tables_are_sampled_and_the_result_says_so(app_url: str) -> None:
    _dirty(app_url)
    big = {"exact_max_pages": 0, "sample_pages": 10**6}  # "large", sample covers it all
    results = _run_checks(app_url, {DECLINES: big, FINGERPRINTS: big})
    for name in ("no_declines_past_retention", "no_old_orphan_fingerprints"):
        metadata = results[name].metadata
        assert metadata["exact"].value is False
        assert str(metadata["method"].value).startswith("estimate from a")
        assert metadata["offending_rows"].value == 1


def test_invalid_check_config_fails_with_words(app_url: str) -> None:
    os.environ["APP_DATABASE_URL"] = app_url
    job = defs.resolve_job_def(checks.CHECKS_JOB)
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(
            run_config={"ops": {SESSIONS: {"config": {"severity": "LOUD"}}}},
            instance=instance,
            raise_on_error=False,
        )
    assert not result.success
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "severity is 'LOUD'; use WARN or ERROR." in str(failures[0].event_specific_data)


def test_sensors_launch_the_checks_after_each_finished_cleanup_run() -> None:
    os.environ["APP_DATABASE_URL"] = "postgresql://nobody@127.0.0.1:1/none"  # never connected
    sensors = {s.name: s for s in defs.sensors or []}
    job = defs.resolve_job_def("session_cleanup_job")
    for status, name in [
        (dg.DagsterRunStatus.SUCCESS, "session_cleanup_checks_after_success"),
        (dg.DagsterRunStatus.FAILURE, "session_cleanup_checks_after_failure"),
    ]:
        sensor = sensors[name]
        assert isinstance(sensor, dg.RunStatusSensorDefinition)
        assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
        assert sensor.job_name == checks.CHECKS_JOB
        with dg.instance_for_test() as instance:
            run = instance.create_run_for_job(job_def=job, run_config={}, status=status)
            event_type = (
                dg.DagsterEventType.RUN_SUCCESS
                if status == dg.DagsterRunStatus.SUCCESS
                else dg.DagsterEventType.RUN_FAILURE
            )
            event = dg.DagsterEvent(event_type.value, job_name=job.name)
            context = dg.build_run_status_sensor_context(
                sensor_name=name, dagster_event=event, dagster_instance=instance, dagster_run=run
            )
            request = sensor(context)
        assert isinstance(request, dg.RunRequest)
        assert request.run_key == run.run_id
