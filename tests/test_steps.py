"""The SQL functions against a real PostgreSQL: every rule of the contract, row by row.

Touches: session_cleanup_dagster.steps on a fresh database per test. Each test compares the
whole state of all four tables to tests.model, which encodes DESIGN.md's contract.
"""

from __future__ import annotations

import re
import threading
from datetime import timedelta

import psycopg
import pytest
import sqlalchemy as sa

from session_cleanup_dagster import steps
from session_cleanup_dagster.steps import StepOptions
from tests import data, model, pg
from tests.data import T, uid


def run_all(url: str, cutoff=T, options: StepOptions = StepOptions()) -> dict[str, int]:
    engine = pg.engine(url)
    try:
        return run_all_on(engine, options, cutoff)
    finally:
        engine.dispose()


def run_all_on(engine: sa.Engine, options: StepOptions, cutoff=T) -> dict[str, int]:
    return {
        "sessions": steps.expire_sessions(engine, cutoff, options).changed,
        "declines": steps.purge_declines(engine, cutoff, options).changed,
        "fingerprints": steps.remove_orphan_fingerprints(engine, cutoff, options).changed,
    }


def test_every_rule_at_its_boundaries(app_url: str) -> None:
    data.boundaries(app_url)
    before = pg.snapshot(app_url)
    counts = run_all(app_url)
    after = pg.snapshot(app_url)
    assert after == model.cleanup(before, T)
    assert counts == {"sessions": 3, "declines": 2, "fingerprints": 2}


def test_expired_open_session_gets_ended_at_equal_to_expires_at(app_url: str) -> None:
    data.boundaries(app_url)
    engine = pg.engine(app_url)
    steps.expire_sessions(engine, T)
    engine.dispose()
    sessions = {row["id"]: row for row in pg.snapshot(app_url)["after_hours_sessions"]}
    assert sessions[uid(101)]["ended_at"] == sessions[uid(101)]["expires_at"]
    assert sessions[uid(102)]["ended_at"] is None  # expires_at == T is not before T
    assert sessions[uid(104)]["ended_at"] == T - 4 * data.DAY  # already ended: untouched


@pytest.mark.parametrize(
    "step_name", ["expire_sessions", "purge_declines", "remove_orphan_fingerprints"]
)
def test_each_step_changes_only_its_own_rows(app_url: str, step_name: str) -> None:
    data.boundaries(app_url)
    before = pg.snapshot(app_url)
    engine = pg.engine(app_url)
    getattr(steps, step_name)(engine, T)
    engine.dispose()
    assert pg.snapshot(app_url) == getattr(model, step_name)(before, T)


def test_second_run_with_same_cutoff_changes_nothing(app_url: str) -> None:
    data.boundaries(app_url)
    run_all(app_url)
    once = pg.snapshot(app_url)
    assert run_all(app_url) == {"sessions": 0, "declines": 0, "fingerprints": 0}
    assert pg.snapshot(app_url) == once


def test_earlier_cutoff_after_a_run_changes_nothing(app_url: str) -> None:
    data.boundaries(app_url)
    run_all(app_url)
    once = pg.snapshot(app_url)
    assert run_all(app_url, cutoff=T - timedelta(days=3)) == {
        "sessions": 0,
        "declines": 0,
        "fingerprints": 0,
    }
    assert pg.snapshot(app_url) == once


def test_dry_run_changes_nothing_and_counts_what_a_real_run_changes(app_url: str) -> None:
    data.boundaries(app_url)
    before = pg.snapshot(app_url)
    dry = run_all(app_url, options=StepOptions(dry_run=True))
    assert pg.snapshot(app_url) == before
    assert run_all(app_url) == dry


def test_dry_run_reports_sample_ids_of_matching_rows(app_url: str) -> None:
    data.boundaries(app_url)
    engine = pg.engine(app_url)
    result = steps.purge_declines(engine, T, StepOptions(dry_run=True))
    engine.dispose()
    assert set(result.sample_ids) == {str(uid(201)), str(uid(204))}


@pytest.mark.parametrize("batch_size", [1, 2, 50_000])
def test_batch_size_does_not_change_the_end_state(app_url: str, batch_size: int) -> None:
    data.boundaries(app_url)
    before = pg.snapshot(app_url)
    run_all(app_url, options=StepOptions(batch_size=batch_size))
    assert pg.snapshot(app_url) == model.cleanup(before, T)


# A statement that changes the app's rows (an UPDATE or DELETE, perhaps inside a CTE).
WRITE = re.compile(r"\b(UPDATE|DELETE FROM) public\.(after_hours_|device_fingerprints)")


def test_every_batch_commits_without_waiting_for_its_wal_flush(app_url: str) -> None:
    """Each transaction that changes the app's rows starts with synchronous_commit off."""
    data.boundaries(app_url)
    before = pg.snapshot(app_url)
    engine = pg.engine(app_url)
    open_: dict[int, list[str]] = {}
    committed: list[list[str]] = []

    @sa.event.listens_for(engine, "begin")
    def begin(conn: sa.Connection) -> None:
        open_[id(conn)] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def statement(conn: sa.Connection, cursor, sql: str, *args: object) -> None:
        open_.setdefault(id(conn), []).append(sql)

    @sa.event.listens_for(engine, "commit")
    def commit(conn: sa.Connection) -> None:
        committed.append(open_.pop(id(conn), []))

    # Batches of 1: many transactions, on the orphan walk's own connection too.
    run_all_on(engine, StepOptions(batch_size=1))
    engine.dispose()
    assert pg.snapshot(app_url) == model.cleanup(before, T)
    writing = [sqls for sqls in committed if any(WRITE.search(sql) for sql in sqls)]
    # Batches of one row: at least one per change of the boundaries' 7.
    assert len(writing) >= 3 + 2 + 2, committed
    for sqls in writing:
        assert sqls[0] == "SET LOCAL synchronous_commit = off", sqls


def test_batch_size_one_makes_one_transaction_per_row(app_url: str) -> None:
    data.boundaries(app_url)
    engine = pg.engine(app_url)
    result = steps.expire_sessions(engine, T, StepOptions(batch_size=1))
    engine.dispose()
    assert (result.changed, result.batches) == (3, 3)


def test_many_rows_over_many_pages_in_small_batches(app_url: str) -> None:
    from session_cleanup_dev.seed import seed_database

    engine = pg.engine(app_url)
    seed_database(engine, 300, anchor=T, create_schema=False)
    engine.dispose()
    before = pg.snapshot(app_url)
    run_all(app_url, options=StepOptions(batch_size=7))
    assert pg.snapshot(app_url) == model.cleanup(before, T)


def _hold_row_lock(url: str, sql: str, locked: threading.Event, release: threading.Event) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(sql)
        locked.set()
        release.wait(30)
        conn.rollback()


@pytest.mark.parametrize(
    ("step_name", "lock_sql", "locked_id"),
    [
        (
            "expire_sessions",
            "SELECT 1 FROM after_hours_sessions WHERE id = '00000000-0000-0000-0000-000000000065'"
            " FOR UPDATE",
            uid(101),
        ),
        (
            "purge_declines",
            "SELECT 1 FROM after_hours_declines WHERE id = '00000000-0000-0000-0000-0000000000c9'"
            " FOR UPDATE",
            uid(201),
        ),
        (
            "remove_orphan_fingerprints",
            "SELECT 1 FROM device_fingerprints WHERE id = '00000000-0000-0000-0000-00000000012d'"
            " FOR UPDATE",
            uid(301),
        ),
    ],
)
def test_row_locked_by_the_app_is_skipped_without_waiting_and_left_for_next_run(
    app_url: str, step_name: str, lock_sql: str, locked_id
) -> None:
    data.boundaries(app_url)
    before = pg.snapshot(app_url)
    locked, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold_row_lock, args=(app_url, lock_sql, locked, release))
    holder.start()
    try:
        assert locked.wait(10)
        engine = pg.engine(app_url)
        result = getattr(steps, step_name)(engine, T)
        engine.dispose()
        # The lock is still held: the step returned without waiting for it.
        assert holder.is_alive()
        expected = getattr(model, step_name)(before, T)
        during = pg.snapshot(app_url)
    finally:
        release.set()
        holder.join()
    # Everything but the locked row is as the contract says; the locked row is untouched.
    locked_before = pg.row_with_id(before, locked_id)
    assert pg.row_with_id(during, locked_id) == locked_before
    assert pg.without_row(during, locked_id) == pg.without_row(expected, locked_id)
    # The next run finishes the work.
    engine = pg.engine(app_url)
    again = getattr(steps, step_name)(engine, T)
    engine.dispose()
    assert again.changed == 1
    assert pg.snapshot(app_url) == expected
    assert result.changed >= 1


def test_safety_cap_stops_before_passing_max_rows_and_keeps_batches_whole(app_url: str) -> None:
    data.boundaries(app_url)
    before = pg.snapshot(app_url)
    engine = pg.engine(app_url)
    with pytest.raises(steps.SafetyCapExceeded) as raised:
        steps.expire_sessions(engine, T, StepOptions(batch_size=2, max_rows=2))
    engine.dispose()
    assert (raised.value.changed, raised.value.max_rows) == (2, 2)
    after = pg.snapshot(app_url)
    ended = [
        r
        for r, b in zip(after["after_hours_sessions"], before["after_hours_sessions"], strict=True)
        if r != b
    ]
    assert len(ended) == 2
    assert "max_rows=2" in str(raised.value)


def test_safety_cap_equal_to_the_work_lets_the_step_finish(app_url: str) -> None:
    data.boundaries(app_url)
    engine = pg.engine(app_url)
    result = steps.expire_sessions(engine, T, StepOptions(batch_size=2, max_rows=3))
    engine.dispose()
    assert result.changed == 3


def test_orphan_step_uses_not_exists_so_a_null_session_id_does_not_hide_orphans(
    app_url: str,
) -> None:
    # With NOT IN, one NULL in the subquery makes every comparison unknown: nothing deleted.
    data.boundaries(app_url)
    before = pg.snapshot(app_url)
    engine = pg.engine(app_url)
    result = steps.remove_orphan_fingerprints(engine, T)
    engine.dispose()
    assert result.changed == 2
    assert pg.snapshot(app_url) == model.remove_orphan_fingerprints(before, T)
