"""The job in production's topology: behind PgBouncer, beside a streaming replica, on failover.

Touches: resources (session limits set after connecting), topology.py (standby and transaction
pooling refused before any change), health.py (holding batches for replica lag), the transient
handling of a primary turned read-only, and the cutoff's clock-skew wait; all through the job
in process against real PgBouncer and real PostgreSQL processes (tests/topology.py). Every
run's end state is compared, whole, with the contract's.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pytest
import sqlalchemy as sa

from session_cleanup_dagster.resources import make_engine
from tests import data, model, pg, topology
from tests.data import T
from tests.jobrun import OPS, attempts, failure_message, output_metadata, run_job
from tests.stack import wait_for

pytestmark = pytest.mark.slow  # ./run test starts the long modules first

PARTITION = "2026-11-27"  # its window ends at T
GRANTS = Path(__file__).resolve().parent.parent / "docs" / "grants.sql"
SMALL = {op: {"batch_size": 10, "target_batch_ms": 0} for op in OPS}


def _seed(url: str, users: int) -> pg.Snapshot:
    pg.create_schema(url)
    return data.seed(url, users)


def _logs(instance: dg.DagsterInstance, run_id: str, level: int) -> list[str]:
    return [
        entry.user_message
        for entry in instance.all_logs(run_id)
        if entry.level == level and not entry.is_dagster_event
    ]


def _changed(before: pg.Snapshot, url: str) -> int:
    """How many rows of ``before`` are no longer there as they were (ended or deleted)."""
    after = pg.snapshot(url)
    changed = 0
    for table in pg.TABLES:
        now = {tuple(row.items()) for row in after[table]}
        changed += sum(1 for row in before[table] if tuple(row.items()) not in now)
    return changed


class Background:
    """The job in a thread, so the test can watch it and change the world around it."""

    def __init__(self, instance: dg.DagsterInstance, url: str, **kwargs: Any) -> None:
        self.run_id = str(uuid.uuid4())
        self.result: dg.ExecuteInProcessResult | None = None
        self.error: BaseException | None = None

        def target() -> None:
            try:
                self.result = run_job(url, instance=instance, run_id=self.run_id, **kwargs)
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def join(self, timeout: float = 180) -> dg.ExecuteInProcessResult:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the job did not finish"
        assert self.error is None, self.error
        assert self.result is not None
        return self.result


# --- PgBouncer ---------------------------------------------------------------------------------


def test_session_pooling_pgbouncer_runs_the_job_exactly_and_keeps_the_session_limits(
    admin_url: str, database_url: str
) -> None:
    before = _seed(database_url, 200)
    with topology.pgbouncer(admin_url, "session") as bouncer:
        url = pg.database_url(bouncer, pg.database_name(database_url))
        result = run_job(url, partition_key=PARTITION)
        assert result.success
        assert pg.snapshot(database_url) == model.cleanup(before, T)
        engine = make_engine(
            url,
            lock_timeout_ms=1234,
            statement_timeout_ms=45678,
            idle_in_transaction_timeout_ms=2500,
        )
        try:
            with engine.connect() as conn:
                names = (
                    "lock_timeout",
                    "statement_timeout",
                    "idle_in_transaction_session_timeout",
                    "client_connection_check_interval",
                    "jit",
                )
                shown = {n: conn.execute(sa.text(f"SHOW {n}")).scalar_one() for n in names}
        finally:
            engine.dispose()
    assert shown == {
        "lock_timeout": "1234ms",
        "statement_timeout": "45678ms",
        "idle_in_transaction_session_timeout": "2500ms",
        "client_connection_check_interval": "2s",
        "jit": "off",
    }


def test_transaction_pooling_is_refused_before_any_row_changes(
    admin_url: str, database_url: str
) -> None:
    before = _seed(database_url, 50)
    with topology.pgbouncer(admin_url, "transaction") as bouncer:
        url = pg.database_url(bouncer, pg.database_name(database_url))
        result = run_job(url, partition_key=PARTITION)
    assert not result.success
    for op in OPS:
        message = failure_message(result, op)
        assert "goes through a pooler in transaction pooling mode" in message
        assert "PgBouncer pool_mode = session" in message
        assert "Nothing was changed." in message
        assert attempts(result, op) == 1
    assert pg.snapshot(database_url) == before


# --- a streaming replica -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def replica() -> Iterator[topology.ReplicaPair]:
    with topology.replica_pair() as pair:
        yield pair


@pytest.fixture
def primary_app(replica: topology.ReplicaPair) -> Iterator[str]:
    """A fresh database on the primary (replicated to the standby); replay runs again after."""
    with pg.scratch_database(replica.primary_url) as url:
        try:
            yield url
        finally:
            replica.resume_replay()
            pg.execute(url, "ALTER SYSTEM RESET default_transaction_read_only")
            pg.execute(url, "SELECT pg_reload_conf()")


def test_a_standby_url_fails_fast_and_says_to_use_the_primary(
    replica: topology.ReplicaPair, primary_app: str
) -> None:
    before = _seed(primary_app, 50)
    replica.wait_caught_up()
    standby = pg.database_url(replica.standby_url, pg.database_name(primary_app))
    result = run_job(standby, partition_key=PARTITION)
    for op in OPS:
        message = failure_message(result, op)
        assert "APP_DATABASE_URL leads to a read-only standby (pg_is_in_recovery() is true)" in (
            message
        )
        assert "Point APP_DATABASE_URL at the primary" in message
        assert attempts(result, op) == 1
    assert pg.snapshot(primary_app) == before


def _held(
    instance: dg.DagsterInstance, replica: topology.ReplicaPair, url: str
) -> tuple[pg.Snapshot, Background, list[str]]:
    """Seed, pause the standby's replay, start the job; return once a step holds."""
    before = _seed(url, 2000)
    replica.wait_caught_up()
    replica.pause_replay()
    job = Background(
        instance, url, partition_key=PARTITION, op_config=SMALL, app_db={"max_replica_lag_mb": 1}
    )
    holding = wait_for(
        "a step to hold for the paused replica",
        lambda: [m for m in _logs(instance, job.run_id, logging.WARNING) if "holding batches" in m],
        120,
    )
    return before, job, holding


def test_replica_lag_holds_batches_then_resumes_and_the_database_matches_the_contract(
    replica: topology.ReplicaPair, primary_app: str
) -> None:
    with dg.instance_for_test() as instance:
        before, job, holding = _held(instance, replica, primary_app)
        assert "MB behind (limit 1 MB, app_db.max_replica_lag_mb)" in holding[0]
        # Held: some rows changed, and no batch runs while the replica stays behind.
        done = _changed(before, primary_app)
        assert done > 0
        time.sleep(2)
        assert _changed(before, primary_app) == done
        replica.resume_replay()
        result = job.join()
    assert result.success
    assert pg.snapshot(primary_app) == model.cleanup(before, T)
    held = [output_metadata(result, op)["replica_hold_s"] for op in OPS]
    assert max(held) > 0, held


def test_a_hold_past_its_limit_fails_keeping_whole_batches_and_the_next_run_finishes(
    replica: topology.ReplicaPair, primary_app: str
) -> None:
    before = _seed(primary_app, 2000)
    replica.wait_caught_up()
    replica.pause_replay()
    result = run_job(
        primary_app,
        partition_key=PARTITION,
        op_config=SMALL,
        app_db={"max_replica_lag_mb": 1, "replica_hold_max_s": 2},
    )
    assert not result.success
    failed = [op for op in OPS if not result.is_node_success(op)]
    assert failed
    for op in failed:
        message = failure_message(result, op)
        assert "(app_db.replica_hold_max_s) while replicas stayed more than 1 MB behind" in message
        assert attempts(result, op) == 1
    after = pg.snapshot(primary_app)
    final = model.cleanup(before, T)
    for table in pg.TABLES:  # every row as before or as the contract leaves it
        want = {r["id"]: r for r in final[table]}
        was = {r["id"]: r for r in before[table]}
        assert all(r == was[r["id"]] or r == want.get(r["id"]) for r in after[table]), table
    replica.resume_replay()
    assert run_job(primary_app, partition_key=PARTITION).success
    assert pg.snapshot(primary_app) == final


def test_a_hold_stops_as_soon_as_the_run_is_canceled(
    replica: topology.ReplicaPair, primary_app: str
) -> None:
    with dg.instance_for_test() as instance:
        before, job, _ = _held(instance, replica, primary_app)
        run = instance.get_run_by_id(job.run_id)
        assert run is not None
        asked = time.monotonic()
        instance.report_run_canceling(run)
        result = job.join(30)
        took = time.monotonic() - asked
        canceled = [m for m in _logs(instance, job.run_id, logging.WARNING) if "canceled" in m]
    assert took < 5, took
    assert not result.success
    done = _changed(before, primary_app)
    assert done > 0
    time.sleep(1.5)
    assert _changed(before, primary_app) == done, "a batch ran after the cancel"
    assert pg.snapshot(primary_app) != model.cleanup(before, T)
    assert any("run canceled while holding" in m for m in canceled), canceled


def test_a_role_without_pg_monitor_warns_once_and_is_not_held(
    replica: topology.ReplicaPair, primary_app: str
) -> None:
    before = _seed(primary_app, 300)
    role = f"sct_nomon_{uuid.uuid4().hex[:8]}"
    grants = re.sub(r"\bsession_cleanup\b", role, GRANTS.read_text())
    with psycopg.connect(primary_app, autocommit=True) as conn:
        conn.execute(grants.encode())
    replica.wait_caught_up()
    replica.pause_replay()
    try:
        with dg.instance_for_test() as instance:
            result = run_job(
                pg.as_role(primary_app, role),
                partition_key=PARTITION,
                op_config=SMALL,
                app_db={"max_replica_lag_mb": 1},
                instance=instance,
            )
            warnings = _logs(instance, result.run_id, logging.WARNING)
        assert result.success
        assert pg.snapshot(primary_app) == model.cleanup(before, T)
        unseen = [w for w in warnings if "cannot see the replicas' replay positions" in w]
        assert len(unseen) == len(OPS), warnings  # once per step
    finally:
        replica.resume_replay()
        pg.execute(primary_app, f'DROP OWNED BY "{role}"')
        pg.execute(primary_app, f'DROP ROLE "{role}"')


# --- failover and clocks -----------------------------------------------------------------------


def test_a_primary_turned_read_only_mid_run_is_retried_on_fresh_connections(
    primary_app: str,
) -> None:
    before = _seed(primary_app, 1000)
    with dg.instance_for_test() as instance:
        job = Background(instance, primary_app, partition_key=PARTITION, op_config=SMALL)
        wait_for("batches to commit", lambda: _changed(before, primary_app) > 50, 60, 0.05)
        # What a failover looks like to a connection that stays: its server is read-only now.
        pg.execute(primary_app, "ALTER SYSTEM SET default_transaction_read_only = on")
        pg.execute(primary_app, "SELECT pg_reload_conf()")
        wait_for(
            "the read-only error to be retried",
            lambda: [
                m
                for m in _logs(instance, job.run_id, logging.WARNING)
                if "read-only transaction [SQLSTATE 25006]" in m and "retried" in m
            ],
            60,
        )
        pg.execute(primary_app, "ALTER SYSTEM RESET default_transaction_read_only")
        pg.execute(primary_app, "SELECT pg_reload_conf()")
        result = job.join()
    assert result.success
    assert pg.snapshot(primary_app) == model.cleanup(before, T)


def test_a_cutoff_a_little_ahead_of_the_database_clock_is_waited_for(app_url: str) -> None:
    before = data.seed(app_url, 100, anchor=None)
    with psycopg.connect(app_url) as conn:
        row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    # Ahead by more than the in-process run takes to reach its first op (seconds, under load).
    cutoff = row[0] + timedelta(seconds=15)
    as_of = cutoff.isoformat()
    config = {op: {"as_of": as_of} for op in OPS}
    with dg.instance_for_test() as instance:
        result = run_job(app_url, op_config=config, instance=instance)
        warnings = _logs(instance, result.run_id, logging.WARNING)
    assert result.success
    assert any("ahead of the database's clock" in w and "clock skew" in w for w in warnings)
    assert pg.snapshot(app_url) == model.cleanup(before, cutoff)
