"""The whole job through Dagster (execute_in_process) against a real PostgreSQL.

Touches: definitions, ops, config, cutoff and the app_db resource, on a fresh database per
test. State is compared to tests.model for all four tables.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest

from session_cleanup_dagster.definitions import defs
from tests import data, model, pg
from tests.data import T
from tests.jobrun import OPS, attempts, failure_message, output_metadata, run_job


def test_partitioned_run_uses_the_partition_end_as_cutoff(app_url: str) -> None:
    data.boundaries(app_url)
    before = pg.snapshot(app_url)
    result = run_job(app_url, partition_key="2026-11-27")
    assert result.success
    assert pg.snapshot(app_url) == model.cleanup(before, T)
    for op in OPS:
        meta = output_metadata(result, op)
        assert meta["cutoff_iso"] == "2026-11-28T04:00:00+00:00"
        assert meta["cutoff_source"] == "partition"
    assert output_metadata(result, "expire_sessions")["rows_changed"] == 3
    assert output_metadata(result, "purge_declines")["rows_changed"] == 2
    assert output_metadata(result, "remove_orphan_fingerprints")["rows_changed"] == 2


def test_the_orphan_step_runs_before_expire_sessions_rewrites_session_rows(app_url: str) -> None:
    # Its probes of the sessions' primary key stay index-only only until expire_sessions
    # rewrites session rows (ops.py); the in-process executor honours dagster/priority.
    data.boundaries(app_url)
    result = run_job(app_url, partition_key="2026-11-27")
    assert result.success
    started = [
        event.step_key for event in result.all_events if event.event_type_value == "STEP_START"
    ]
    assert started == ["remove_orphan_fingerprints", "expire_sessions", "purge_declines"]


def test_output_metadata_has_counts_batches_cutoff_duration_rate(app_url: str) -> None:
    data.boundaries(app_url)
    result = run_job(app_url, partition_key="2026-11-27")
    meta = output_metadata(result, "purge_declines")
    assert {"rows_changed", "batches", "cutoff", "duration_s", "rows_per_s", "dry_run"} <= set(meta)
    assert meta["dry_run"] is False
    assert meta["batches"] >= 1


def test_as_of_sets_the_cutoff_of_an_unpartitioned_run(app_url: str) -> None:
    data.boundaries(app_url)
    before = pg.snapshot(app_url)
    as_of = "2026-11-28T05:00:00+01:00"  # the same instant as T
    result = run_job(app_url, op_config={op: {"as_of": as_of} for op in OPS})
    assert result.success
    assert pg.snapshot(app_url) == model.cleanup(before, T)
    assert output_metadata(result, "expire_sessions")["cutoff_source"] == "as_of"


def test_run_without_partition_or_as_of_uses_database_now_once_for_all_ops(
    app_url: str,
) -> None:
    data.boundaries(app_url)
    before = pg.snapshot(app_url)
    with dg.instance_for_test() as instance:
        result = run_job(app_url, instance=instance)
        run = instance.get_run_by_id(result.run_id)
    assert result.success
    cutoffs = {output_metadata(result, op)["cutoff_iso"] for op in OPS}
    assert len(cutoffs) == 1
    cutoff = datetime.fromisoformat(cutoffs.pop())
    assert abs((datetime.now(UTC) - cutoff).total_seconds()) < 300
    assert output_metadata(result, "purge_declines")["cutoff_source"] == "database_now"
    assert pg.snapshot(app_url) == model.cleanup(before, cutoff)
    assert run is not None and run.tags["session_cleanup/cutoff"] == cutoff.isoformat()


def test_dry_run_through_the_job_changes_nothing_and_reports_samples(app_url: str) -> None:
    data.boundaries(app_url)
    before = pg.snapshot(app_url)
    result = run_job(
        app_url, partition_key="2026-11-27", op_config={op: {"dry_run": True} for op in OPS}
    )
    assert result.success
    assert pg.snapshot(app_url) == before
    meta = output_metadata(result, "purge_declines")
    assert (meta["rows_changed"], meta["rows_matched"], meta["dry_run"]) == (0, 2, True)
    assert str(data.uid(201)) in meta["sample_ids"]


def test_a_failing_step_does_not_stop_the_others_but_fails_the_run(app_url: str) -> None:
    data.boundaries(app_url)
    before = pg.snapshot(app_url)
    pg.execute(app_url, "ALTER TABLE after_hours_declines DROP COLUMN created_at")
    result = run_job(app_url, partition_key="2026-11-27")
    assert not result.success
    assert "column public.after_hours_declines.created_at does not exist" in failure_message(
        result, "purge_declines"
    )
    assert attempts(result, "purge_declines") == 1  # permanent: not retried
    after = pg.snapshot(app_url)
    expected = model.remove_orphan_fingerprints(model.expire_sessions(before, T), T)
    assert after["after_hours_sessions"] == expected["after_hours_sessions"]
    assert after["device_fingerprints"] == expected["device_fingerprints"]
    assert len(after["after_hours_declines"]) == len(before["after_hours_declines"])


def test_missing_table_fails_at_once_and_names_it(app_url: str) -> None:
    pg.execute(app_url, "DROP TABLE device_fingerprints")
    result = run_job(app_url, partition_key="2026-11-27")
    message = failure_message(result, "remove_orphan_fingerprints")
    assert "table public.device_fingerprints does not exist" in message
    assert "APP_DATABASE_URL" in message
    assert attempts(result, "remove_orphan_fingerprints") == 1
    assert result.is_node_success("expire_sessions")


@pytest.mark.parametrize(
    ("index", "op", "table", "column"),
    [
        (
            "after_hours_sessions_open_expires_idx",
            "expire_sessions",
            "after_hours_sessions",
            "expires_at",
        ),
        (
            "device_fingerprints_session_id_idx",
            "remove_orphan_fingerprints",
            "device_fingerprints",
            "session_id",
        ),
    ],
)
def test_missing_index_fails_fast_and_says_how_to_create_it(
    app_url: str, index: str, op: str, table: str, column: str
) -> None:
    data.boundaries(app_url)
    pg.execute(app_url, f"DROP INDEX {index}")
    before = pg.snapshot(app_url)
    result = run_job(app_url, partition_key="2026-11-27")
    message = failure_message(result, op)
    assert f"no index on public.{table} starts with {column}" in message
    assert f"CREATE INDEX CONCURRENTLY ON {table} ({column}" in message
    assert attempts(result, op) == 1
    # The other two steps ran; the one without its index changed nothing.
    expected = before
    for other in ("expire_sessions", "purge_declines", "remove_orphan_fingerprints"):
        if other != op:
            assert result.is_node_success(other), other
            expected = getattr(model, other)(expected, T)
    assert pg.snapshot(app_url) == expected


def _warnings(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [
        entry.user_message
        for entry in instance.all_logs(run_id)
        if entry.level == logging.WARNING and not entry.is_dagster_event
    ]


def test_full_expires_at_index_works_but_warns_with_the_partial_index_to_create(
    app_url: str,
) -> None:
    data.boundaries(app_url)
    pg.execute(app_url, "DROP INDEX after_hours_sessions_open_expires_idx")
    pg.execute(app_url, "CREATE INDEX sct_full_idx ON after_hours_sessions (expires_at)")
    before = pg.snapshot(app_url)
    with dg.instance_for_test() as instance:
        result = run_job(app_url, partition_key="2026-11-27", instance=instance)
        assert result.success
        assert pg.snapshot(app_url) == model.cleanup(before, T)
        [warning] = [w for w in _warnings(instance, result.run_id) if "not partial" in w]
        assert warning.startswith(
            "expire_sessions: the index on public.after_hours_sessions (expires_at) is not "
            "partial (WHERE ended_at IS NULL)"
        )
        assert (
            "Fix: CREATE INDEX CONCURRENTLY ON after_hours_sessions (expires_at) "
            "WHERE ended_at IS NULL;" in warning
        )
        # With the partial index (any spelling of its predicate) there is nothing to say.
        pg.execute(
            app_url,
            "CREATE INDEX sct_partial_idx ON after_hours_sessions (expires_at)"
            " WHERE (ended_at is null)",
        )
        result = run_job(app_url, partition_key="2026-11-27", instance=instance)
        assert result.success
        assert not [w for w in _warnings(instance, result.run_id) if "not partial" in w]


def test_wrong_column_type_fails_before_any_change(app_url: str) -> None:
    data.boundaries(app_url)
    pg.execute(app_url, "ALTER TABLE after_hours_declines ALTER COLUMN created_at TYPE text")
    before = pg.snapshot(app_url)
    result = run_job(app_url, partition_key="2026-11-27")
    message = failure_message(result, "purge_declines")
    assert "is text, but this job needs timestamp with time zone" in message
    assert pg.snapshot(app_url)["after_hours_declines"] == before["after_hours_declines"]


def test_role_without_delete_fails_fast_naming_the_grant(app_url: str) -> None:
    data.boundaries(app_url)
    role = "sct_nodelete_" + pg.database_name(app_url)[-12:]
    pg.execute(app_url, f'CREATE ROLE "{role}" LOGIN')
    try:
        pg.execute(app_url, f'GRANT SELECT, UPDATE ON ALL TABLES IN SCHEMA public TO "{role}"')
        pg.execute(app_url, f'GRANT DELETE ON after_hours_declines TO "{role}"')
        before = pg.snapshot(app_url)
        role_url = pg.as_role(app_url, role)
        result = run_job(role_url, partition_key="2026-11-27")
        message = failure_message(result, "remove_orphan_fingerprints")
        assert f"role {role} lacks DELETE on public.device_fingerprints" in message
        assert f"GRANT DELETE ON public.device_fingerprints TO {role}" in message
        assert attempts(result, "remove_orphan_fingerprints") == 1
        after = pg.snapshot(app_url)
        assert after["device_fingerprints"] == before["device_fingerprints"]
        assert after == model.purge_declines(model.expire_sessions(before, T), T)
    finally:
        pg.execute(app_url, f'DROP OWNED BY "{role}"')
        pg.execute(app_url, f'DROP ROLE "{role}"')


def test_unreachable_database_is_retried_with_backoff_then_fails_clearly() -> None:
    url = "postgresql://cleanup:s3cret-pw@127.0.0.1:1/app"  # nothing listens on port 1
    # A short first wait keeps the test quick; tests/operations/test_queue.py waits out the
    # default 2 s.
    config = {op: {"retry_delay_s": 0.2} for op in OPS}
    result = run_job(url, partition_key="2026-11-27", op_config=config)
    assert not result.success
    message = failure_message(result, "expire_sessions")
    assert "127.0.0.1:1/app" in message and "Connection refused" in message
    assert "s3cret-pw" not in message
    for op in OPS:
        assert attempts(result, op) == 4  # the first try and 3 retries
        # The backoff each retry asked for: 0.2, 0.4, 0.8 s, each +-50 % jitter.
        waits = [
            e.step_retry_data.seconds_to_wait
            for e in result.events_for_node(op)
            if e.event_type_value == "STEP_UP_FOR_RETRY"
        ]
        assert [0.1 * 2**i <= (w or 0) <= 0.3 * 2**i for i, w in enumerate(waits)] == [True] * 3


def test_invalid_config_is_rejected_before_any_work(app_url: str) -> None:
    data.boundaries(app_url)
    before = pg.snapshot(app_url)
    result = run_job(
        app_url,
        op_config={
            "expire_sessions": {"batch_size": 0},
            "purge_declines": {"retention_days": 100000},
            "remove_orphan_fingerprints": {"as_of": "yesterday"},
        },
    )
    assert not result.success
    assert "batch_size is 0; use 1 to 50000" in failure_message(result, "expire_sessions")
    assert "retention_days is 100000; use 1 to 3650" in failure_message(result, "purge_declines")
    assert "is not an ISO 8601 instant" in failure_message(result, "remove_orphan_fingerprints")
    for op in OPS:
        assert attempts(result, op) == 1
    assert pg.snapshot(app_url) == before


def test_as_of_in_the_future_is_rejected(app_url: str) -> None:
    result = run_job(app_url, op_config={"expire_sessions": {"as_of": "2999-01-01T00:00:00Z"}})
    assert "is in the future" in failure_message(result, "expire_sessions")


def _tick_0400(instance: dg.DagsterInstance) -> dg.ScheduleEvaluationContext:
    """The schedule's tick at 04:00 UTC on 2026-11-28, which targets partition 2026-11-27."""
    return dg.build_schedule_context(
        instance=instance,
        scheduled_execution_time=datetime(2026, 11, 28, 4, 0, tzinfo=UTC),
        repository_def=defs.get_repository_def(),
    )


def test_schedule_tick_at_0400_utc_targets_the_previous_day_with_cutoff_0400(
    app_url: str,
) -> None:
    schedule = defs.get_repository_def().get_schedule_def("session_cleanup_schedule")
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("0 4 * * *", "UTC")
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    with dg.instance_for_test() as instance:
        context = _tick_0400(instance)
        requests = schedule.evaluate_tick(context).run_requests
        assert requests is not None and len(requests) == 1
        assert requests[0].partition_key == "2026-11-27"
        data.boundaries(app_url)
        before = pg.snapshot(app_url)
        result = run_job(app_url, partition_key=requests[0].partition_key, instance=instance)
    assert output_metadata(result, "expire_sessions")["cutoff_iso"] == "2026-11-28T04:00:00+00:00"
    assert pg.snapshot(app_url) == model.cleanup(before, T)


def test_dagsters_own_schedule_builder_still_warns_so_ours_stays() -> None:
    # schedules.py keeps its own schedule for these two reasons; when this test fails, Dagster
    # has fixed them: switch to build_schedule_from_partitioned_job (same cron, same partition).
    job = defs.resolve_job_def("session_cleanup_job")
    builder = dg.build_schedule_from_partitioned_job
    assert builder(job).default_status == dg.DefaultScheduleStatus.STOPPED
    built = builder(job, default_status=dg.DefaultScheduleStatus.RUNNING)
    assert isinstance(built, dg.ScheduleDefinition)  # a job, not an asset selection
    assert (built.cron_schedule, built.execution_timezone) == ("0 4 * * *", "UTC")
    with dg.instance_for_test() as instance:
        context = _tick_0400(instance)
        with pytest.warns(DeprecationWarning, match="run_request_for_partition"):
            requests = built.evaluate_tick(context).run_requests
    assert requests is not None and [r.partition_key for r in requests] == ["2026-11-27"]


def test_both_cleanup_jobs_carry_the_tag_the_run_queue_limits() -> None:
    # dagster.yaml admits one run with this tag at a time (tests/test_deploy.py checks that);
    # the dry run counts beside a real run only if it queues behind it.
    from session_cleanup_dagster.definitions import defs
    from session_cleanup_dagster.jobs import EXCLUSIVE_TAG

    # The checks job only reads (and runs after a cleanup run ends); it needs no queue slot.
    for name in ("session_cleanup_job", "session_cleanup_dry_run_job"):
        job = defs.get_job_def(name)
        assert job.tags.get(EXCLUSIVE_TAG) == "app_db", name


def test_definitions_load_with_warnings_as_errors() -> None:
    code = (
        "import warnings; warnings.simplefilter('error');"
        "import session_cleanup_dagster.definitions as d;"
        "d.defs.get_repository_def().load_all_definitions()"
    )
    subprocess.run([sys.executable, "-W", "error", "-c", code], check=True)


def test_dagster_definitions_validate_passes_without_a_database(tmp_path: Path) -> None:
    # The app database is unreachable: loading the code location must not connect to it.
    env = {
        **os.environ,
        "APP_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
        "DAGSTER_HOME": str(tmp_path),
    }
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "dagster",
            "definitions",
            "validate",
            "-m",
            "session_cleanup_dagster.definitions",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
