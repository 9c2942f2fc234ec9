"""The tables as assets: what each run records on them, dry runs, the backlog, progress lines.

Touches: assets, backlog, dry_run, running and the real job through execute_in_process on a
Dagster test instance, against a fresh PostgreSQL database per test. Database state is
compared to tests.model for all four tables.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import dagster as dg
import psycopg
import pytest
from session_cleanup_dev.seed import seed_database

from session_cleanup_dagster import assets, backlog, op_runner, steps
from session_cleanup_dagster import tables as t
from session_cleanup_dagster.definitions import defs
from session_cleanup_dagster.resources import AppDatabase
from tests import data, model, pg
from tests.data import T
from tests.jobrun import OPS, run_job

KEYS = {
    "expire_sessions": dg.AssetKey(["app_database", "after_hours_sessions"]),
    "purge_declines": dg.AssetKey(["app_database", "after_hours_declines"]),
    "remove_orphan_fingerprints": dg.AssetKey(["app_database", "device_fingerprints"]),
}


def _events(instance: dg.DagsterInstance, key: dg.AssetKey, kind: str) -> list[dict[str, Any]]:
    fetch = instance.fetch_materializations if kind == "m" else instance.fetch_observations
    records = fetch(key, limit=10).records
    return [
        {k: v.value for k, v in record.asset_event.metadata.items()}  # type: ignore[union-attr]
        for record in records
    ]


def test_tables_are_external_assets_in_one_group_with_owners_and_descriptions() -> None:
    specs = {spec.key: spec for spec in defs.assets or [] if isinstance(spec, dg.AssetSpec)}
    assert set(specs) == set(KEYS.values())
    for spec in specs.values():
        assert spec.group_name == "app_database"
        assert spec.owners == ["team:platform"]
        assert spec.description and "Cleanup:" in spec.description


def test_owners_come_from_the_environment_and_are_validated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(assets.OWNERS_ENV, "team:data, dba@example.com")
    assert assets.table_specs()[0].owners == ["team:data", "dba@example.com"]
    monkeypatch.setenv(assets.OWNERS_ENV, "team:data, nobody")
    with pytest.raises(ValueError, match=r"'nobody'.*email address or team:<name>"):
        assets.owners()


def test_real_run_materializes_each_table_with_counts_backlog_duration_cutoff(
    app_url: str,
) -> None:
    data.boundaries(app_url)
    before = pg.snapshot(app_url)
    with dg.instance_for_test() as instance:
        result = run_job(app_url, partition_key="2026-11-27", instance=instance)
        assert result.success
        assert pg.snapshot(app_url) == model.cleanup(before, T)
        changed = {}
        for op in OPS:
            assert _events(instance, KEYS[op], "o") == []
            [meta] = _events(instance, KEYS[op], "m")
            changed[op] = meta["rows_changed"]
            assert meta["backlog_rows"] == 0
            assert meta["backlog_exact"] is True
            assert meta["cutoff_epoch_s"] == T.timestamp()
            assert meta["cutoff"] == T.timestamp()
            assert meta["cutoff_source"] == "partition"
            assert meta["dry_run"] is False
            assert isinstance(meta["duration_s"], float) and meta["duration_s"] >= 0
    assert changed == {"expire_sessions": 3, "purge_declines": 2, "remove_orphan_fingerprints": 2}


def test_dry_run_records_observations_only_and_never_rows_changed(app_url: str) -> None:
    data.boundaries(app_url)
    before = pg.snapshot(app_url)
    with dg.instance_for_test() as instance:
        result = run_job(
            app_url,
            partition_key="2026-11-27",
            op_config={op: {"dry_run": True} for op in OPS},
            instance=instance,
        )
        assert result.success
        assert pg.snapshot(app_url) == before
        for op, due in [("expire_sessions", 3), ("purge_declines", 2)]:
            assert _events(instance, KEYS[op], "m") == []
            [meta] = _events(instance, KEYS[op], "o")
            assert meta["dry_run"] is True
            assert "rows_changed" not in meta and "duration_s" not in meta
            assert (meta["would_change"], meta["backlog_rows"]) == (due, due)
            assert meta["backlog_method"] == "exact, counted by the dry run's own walk"


def test_in_a_run_a_large_table_s_backlog_is_estimated_from_a_bounded_sample(
    app_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Inside the cleanup run, an exact count of a large table would be one long read; past
    # REPORT_EXACT_MAX_PAGES the run estimates from a sample (here: any table is "large").
    monkeypatch.setattr(assets, "REPORT_EXACT_MAX_PAGES", 0)
    data.boundaries(app_url)
    before = pg.snapshot(app_url)
    with dg.instance_for_test() as instance:
        assert run_job(app_url, partition_key="2026-11-27", instance=instance).success
        assert pg.snapshot(app_url) == model.cleanup(before, T)
        for op in OPS:
            [meta] = _events(instance, KEYS[op], "m")
            assert meta["backlog_exact"] is False
            assert "page sample" in meta["backlog_method"]
            assert meta["backlog_rows"] == 0


def test_dry_run_job_forces_dry_run_and_its_default_config_is_complete(app_url: str) -> None:
    data.boundaries(app_url)
    before = pg.snapshot(app_url)
    job = defs.resolve_job_def("session_cleanup_dry_run_job")
    assert set(job.run_config_schema.config_type.fields) == {  # type: ignore[attr-defined]
        "as_of",
        "batch_size",
        "retention_days",
        "grace_minutes",
    }
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(
            run_config={"as_of": "2026-11-28T04:00:00Z"},
            resources={"app_db": AppDatabase(url=app_url)},
            instance=instance,
        )
        assert result.success
        assert pg.snapshot(app_url) == before
        [meta] = _events(instance, KEYS["remove_orphan_fingerprints"], "o")
        assert (meta["would_change"], meta["dry_run"]) == (2, True)
        # The empty config (what the launchpad opens on) is valid: cutoff = database now.
        result = job.execute_in_process(
            resources={"app_db": AppDatabase(url=app_url)}, instance=instance
        )
        assert result.success
    assert pg.snapshot(app_url) == before


def test_backlog_counts_a_row_the_app_held_locked(app_url: str) -> None:
    data.boundaries(app_url)
    before = pg.snapshot(app_url)
    locked = data.uid(201)  # a decline that is due
    with psycopg.connect(app_url) as app, dg.instance_for_test() as instance:
        app.execute("SELECT 1 FROM after_hours_declines WHERE id = %s FOR UPDATE", (locked,))
        result = run_job(app_url, partition_key="2026-11-27", instance=instance)
        [meta] = _events(instance, KEYS["purge_declines"], "m")
        app.rollback()
    assert result.success
    assert (meta["rows_changed"], meta["backlog_rows"]) == (1, 1)
    expected = model.cleanup(before, T)
    kept = [row for row in before["after_hours_declines"] if row["id"] == locked]
    expected["after_hours_declines"] = sorted(
        expected["after_hours_declines"] + kept, key=lambda row: row["id"]
    )
    assert pg.snapshot(app_url) == expected


def test_probe_samples_large_tables_and_says_it_estimated(app_url: str) -> None:
    data.boundaries(app_url)
    eng = pg.engine(app_url)
    try:
        with eng.connect() as conn:
            exact = backlog.probe(conn, "purge_declines", T, samples=5)
            # Every table is "large" here; a sample of more pages than it has reads it all.
            sampled = backlog.probe(
                conn, "purge_declines", T, samples=5, exact_max_pages=0, sample_pages=10**6
            )
            capped = backlog.probe(conn, "expire_sessions", T, cap=2)
    finally:
        eng.dispose()
    assert (exact.rows, exact.exact, set(exact.sample_ids)) == (
        2,
        True,
        {str(data.uid(201)), str(data.uid(204))},
    )
    assert exact.method.startswith("exact, one pass over")
    assert (sampled.rows, sampled.exact) == (2, False)
    assert sampled.method.startswith("estimate from a 1e+02% page sample")
    assert (capped.rows, capped.capped) == (2, True)
    assert "stopped counting at 2" in capped.method


def test_long_steps_log_rows_rate_eta_and_which_estimate(
    app_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    eng = pg.engine(app_url)
    try:
        seed_database(eng, 200, anchor=T)  # 150 due sessions, 600 due declines over many pages
    finally:
        eng.dispose()
    monkeypatch.setattr(op_runner, "PROGRESS_EVERY_S", 0.0)
    with dg.instance_for_test() as instance:
        result = run_job(
            app_url,
            partition_key="2026-11-27",
            op_config={op: {"batch_size": 50} for op in OPS},
            instance=instance,
        )
        logs = [
            record.user_message
            for record in instance.all_logs(result.run_id)
            if "rows/s" in record.user_message and "% of" in record.user_message
        ]
    assert result.success
    sessions = [line for line in logs if line.startswith("expire_sessions:")]
    # A backlog this dense is walked over the heap; a thin one over the partial index.
    assert (
        "of 150 rows (counted from the partial index on open sessions)" in sessions[-1]
        or "pages (from the table's size in pages at the start)" in sessions[-1]
    )
    assert "s left" in sessions[-1]
    declines = [line for line in logs if line.startswith("purge_declines:")]
    assert "pages (from the table's size in pages at the start)" in declines[-1]
    assert "s left" in declines[-1]
    orphans = [line for line in logs if line.startswith("remove_orphan_fingerprints:")]
    assert "fingerprints (first pass, from the planner's row estimate)" in orphans[0]
    assert "orphaned session ids (found by the first pass)" in orphans[-1]


def test_describe_progress_gives_fraction_and_time_left() -> None:
    progress = steps.Progress(step="expire_sessions", changed=500, batches=5)
    progress.started -= 10.0  # ten seconds in
    progress.done_units, progress.total_units, progress.unit = 500, 2000, "rows"
    progress.basis = "counted from the partial index on open sessions"
    line = op_runner.describe_progress(progress)
    assert line.startswith("expire_sessions: 500 rows in 5 batches, 50 rows/s, 25% of 2000 rows")
    assert "counted from the partial index on open sessions" in line
    assert "about 30 s left" in line
    progress.done_units = 0
    assert "left" not in op_runner.describe_progress(progress)
    # A second pass counts its own units: the time left follows its own rate.
    progress.units_started = progress.started + 8.0  # the second pass began 2 s ago
    progress.done_units, progress.total_units, progress.unit = 100, 300, "orphaned session ids"
    assert "33% of 300 orphaned session ids" in op_runner.describe_progress(progress)
    assert "about 4 s left" in op_runner.describe_progress(progress)


def test_step_tables_name_the_real_tables() -> None:
    assert set(assets.STEP_TABLES.values()) == {t.SESSIONS, t.DECLINES, t.FINGERPRINTS}


def test_each_table_has_a_freshness_policy_of_the_staleness_alerts_26_hours() -> None:
    from session_cleanup_dagster.definitions import defs
    from session_cleanup_dagster.sensors import STALE_AFTER_S

    specs = list(defs.resolve_all_asset_specs())
    assert len(specs) == 3
    expected = dg.FreshnessPolicy.time_window(fail_window=timedelta(hours=26))
    assert STALE_AFTER_S == 26 * 3600
    for spec in specs:
        assert spec.freshness_policy == expected, spec.key
