"""The steps' two ways through a table, and their batch sizing, against the contract model.

Touches: session_cleanup_dagster.steps on a fresh database per test. expire_sessions walks
the partial index when few rows are due and the heap when many are; the heap walks take
whole windows in one plain statement once they know how densely rows match, and bound a
window with a LIMIT elsewhere. Whatever path a batch takes, the whole state must equal
tests.model.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from session_cleanup_dev.seed import seed_database

from session_cleanup_dagster import steps
from session_cleanup_dagster import tables as t
from session_cleanup_dagster.steps import StepOptions, StepResult, keyset, loop, orphans
from session_cleanup_dagster.steps.chooser import _Chooser
from tests import data, model, pg
from tests.data import T


def _run(url: str, step: str, options: StepOptions = StepOptions()) -> tuple[StepResult, set[str]]:
    """Run ``step`` at T: its result, and the units its batches walked (rows or pages)."""
    seen: set[str] = set()
    engine = pg.engine(url)
    try:
        result = getattr(steps, step)(engine, T, options, before_batch=lambda p: seen.add(p.unit))
    finally:
        engine.dispose()
    return result, seen


def _units(url: str, step: str, options: StepOptions = StepOptions()) -> set[str]:
    return _run(url, step, options)[1]


def _run_with_row_held(
    url: str, table: str, row_id: Any, step: str, options: StepOptions = StepOptions()
) -> tuple[StepResult, set[str], pg.Snapshot]:
    """Run ``step`` while the app holds row ``row_id`` of ``table`` ``FOR UPDATE``: its
    result, the units it walked, and the database as it left it (the lock still held)."""
    with psycopg.connect(url) as holder:
        holder.execute(f"SELECT 1 FROM {table} WHERE id = %s FOR UPDATE", (row_id,))
        result, units = _run(url, step, options)
        during = pg.snapshot(url)
        holder.rollback()
    return result, units, during


def _insert_orphans(
    url: str, count: int, *, per_session: int, age: Callable[[int], timedelta]
) -> None:
    """Insert ``count`` fingerprints whose sessions do not exist.

    Fingerprint n has id ``uid(910_000 + n)``, session id ``uid(900_000 + n // per_session)``
    and ``created_at = T - age(n)``.
    """
    for n in range(count):
        missing = data.uid(900_000 + n // per_session)
        data.insert_fingerprint(url, data.uid(910_000 + n), missing, T - age(n))


def _missing_session_ids(state: pg.Snapshot) -> set[Any]:
    """The session ids fingerprints name that no session has (what pass 1 must find)."""
    sessions = {row["id"] for row in state["after_hours_sessions"]}
    return {
        row["session_id"]
        for row in state["device_fingerprints"]
        if row["session_id"] is not None and row["session_id"] not in sessions
    }


def _few_due_sessions_among_many(url: str, ties: int = 0) -> None:
    """The boundary rows, 3,000 sessions that ended long ago, and ``ties`` due open sessions
    that share one ``expires_at`` (ids ``uid(700_000 + n)``)."""
    data.boundaries(url)
    # Many sessions that ended long ago: pages the index walk need not read.
    pg.execute(url, "INSERT INTO users (id) SELECT 'pad_' || g FROM generate_series(1, 3000) g")
    pg.execute(
        url,
        "INSERT INTO after_hours_sessions (user_id, expires_at, ended_at, latitude, longitude,"
        " fuzzed_latitude, fuzzed_longitude) SELECT 'pad_' || g, %s, %s, 1, 1, 1, 1"
        " FROM generate_series(1, 3000) g",
        (T - timedelta(days=20), T - timedelta(days=21)),
    )
    for n in range(ties):
        data.insert_user(url, f"tie_{n}")
        data.insert_session(url, data.uid(700_000 + n), f"tie_{n}", T - timedelta(minutes=30))
    pg.execute(url, "ANALYZE")


def _ties_and_expected(url: str) -> tuple[pg.Snapshot, pg.Snapshot]:
    """Five tied due sessions among many: the state, and the state the contract expects."""
    _few_due_sessions_among_many(url, ties=5)
    before = pg.snapshot(url)
    return before, model.expire_sessions(before, T)


def test_few_due_sessions_in_a_large_table_walk_the_partial_index(app_url: str) -> None:
    _few_due_sessions_among_many(app_url)
    before = pg.snapshot(app_url)
    assert _units(app_url, "expire_sessions") == {"rows"}
    assert pg.snapshot(app_url) == model.expire_sessions(before, T)


def test_the_walk_choice_counts_due_sessions_only_up_to_where_the_heap_wins(app_url: str) -> None:
    """The choice needs to know whether the due rows reach one per page, not how many more."""
    _few_due_sessions_among_many(app_url, ties=5)
    before = pg.snapshot(app_url)
    due = model.rows_changed(before, model.expire_sessions(before, T), "after_hours_sessions")
    s = t.reflect("public").sessions
    condition = [s.c.ended_at.is_(None), s.c.expires_at < T]
    walk = keyset._KeysetWalk(s, s.c.expires_at, condition, StepOptions(), basis="")
    engine = pg.engine(app_url)
    try:
        with engine.connect() as conn:
            counted: dict[int | None, int | None] = {}
            for most in (None, 3, due - 1, due, due + 1):
                walk.start(conn, most=most)
                counted[most] = walk.total
    finally:
        engine.dispose()
    assert counted == {None: due, 3: 3, due - 1: due - 1, due: due, due + 1: due}
    assert pg.snapshot(app_url) == before


@pytest.mark.parametrize("batch_size", [1, 2, 4, 1000])
def test_the_index_walk_takes_every_session_sharing_its_batch_s_last_expires_at(
    app_url: str, batch_size: int
) -> None:
    """A plain batch ends at an expires_at, not a row: five equal ones all go in it."""
    _few_due_sessions_among_many(app_url, ties=5)
    before = pg.snapshot(app_url)
    options = StepOptions(batch_size=batch_size)
    assert _units(app_url, "expire_sessions", options) == {"rows"}
    assert pg.snapshot(app_url) == model.expire_sessions(before, T)


def test_the_index_walk_skips_a_session_the_app_holds_locked_and_the_next_run_takes_it(
    app_url: str,
) -> None:
    """The plain UPDATE meets the lock, is rolled back, and its rows go the careful way."""
    before, expected = _ties_and_expected(app_url)
    locked = data.uid(700_002)
    result, units, during = _run_with_row_held(
        app_url, "after_hours_sessions", locked, "expire_sessions", StepOptions(batch_size=2)
    )
    assert units == {"rows"}
    assert result.changed == _changed_sessions(before, expected) - 1
    assert pg.without_row(during, locked) == pg.without_row(expected, locked)
    assert pg.without_row(before, locked) != pg.without_row(expected, locked)
    assert pg.row_with_id(during, locked) == pg.row_with_id(before, locked)
    assert _run(app_url, "expire_sessions")[0].changed == 1
    assert pg.snapshot(app_url) == expected


def test_the_index_walk_stops_at_the_cap_inside_sessions_sharing_an_expires_at(
    app_url: str,
) -> None:
    """A plain batch that would pass max_rows is rolled back; the careful one stops at it."""
    before, expected = _ties_and_expected(app_url)
    engine = pg.engine(app_url)
    try:
        with pytest.raises(steps.SafetyCapExceeded) as raised:
            steps.expire_sessions(engine, T, StepOptions(batch_size=2, max_rows=4))
    finally:
        engine.dispose()
    assert raised.value.changed == 4
    after = pg.snapshot(app_url)
    changed = [
        row
        for row, old in zip(
            after["after_hours_sessions"], before["after_hours_sessions"], strict=True
        )
        if row != old
    ]
    assert len(changed) == 4
    assert all(row in expected["after_hours_sessions"] for row in changed)
    assert {table: rows for table, rows in after.items() if table != "after_hours_sessions"} == {
        table: rows for table, rows in before.items() if table != "after_hours_sessions"
    }


def _changed_sessions(before: pg.Snapshot, after: pg.Snapshot) -> int:
    pairs = zip(before["after_hours_sessions"], after["after_hours_sessions"], strict=True)
    return sum(old != new for old, new in pairs)


def test_a_large_backlog_of_sessions_walks_the_heap(app_url: str) -> None:
    engine = pg.engine(app_url)
    seed_database(engine, 400, anchor=T, create_schema=False)
    engine.dispose()
    before = pg.snapshot(app_url)
    assert _units(app_url, "expire_sessions") == {"pages"}
    assert pg.snapshot(app_url) == model.expire_sessions(before, T)


def _recent_declines(url: str, *, index: bool) -> None:
    """2,000 declines none of which is due at T, the boundary rows, and (``index``) a B-tree
    index on ``after_hours_declines.created_at``, as an app may have."""
    data.seed(url, 400, anchor=T + timedelta(days=90))
    data.boundaries(url)
    if index:
        pg.execute(url, "CREATE INDEX declines_created_at_idx ON after_hours_declines (created_at)")
    pg.execute(url, "ANALYZE")


@pytest.mark.parametrize("batch_size", [1, 2, 1000])
def test_purge_declines_walks_an_index_on_created_at_when_the_app_has_one(
    app_url: str, batch_size: int
) -> None:
    _recent_declines(app_url, index=True)
    before = pg.snapshot(app_url)
    assert _units(app_url, "purge_declines", StepOptions(batch_size=batch_size)) == {"rows"}
    assert pg.snapshot(app_url) == model.purge_declines(before, T)


def test_purge_declines_without_an_index_on_created_at_walks_the_heap(app_url: str) -> None:
    _recent_declines(app_url, index=False)
    before = pg.snapshot(app_url)
    assert _units(app_url, "purge_declines") == {"pages"}
    assert pg.snapshot(app_url) == model.purge_declines(before, T)


def test_purge_declines_index_walk_skips_a_decline_the_app_holds_locked(app_url: str) -> None:
    _recent_declines(app_url, index=True)
    before = pg.snapshot(app_url)
    expected = model.purge_declines(before, T)
    due = [
        row["id"]
        for row in before["after_hours_declines"]
        if row not in expected["after_hours_declines"]
    ]
    locked = due[0]
    _, units, during = _run_with_row_held(app_url, "after_hours_declines", locked, "purge_declines")
    assert units == {"rows"}
    assert pg.without_row(during, locked) == pg.without_row(expected, locked)
    assert pg.row_with_id(during, locked) == pg.row_with_id(before, locked)
    assert _run(app_url, "purge_declines")[0].changed == 1
    assert pg.snapshot(app_url) == expected


@pytest.mark.parametrize(
    "options",
    [
        StepOptions(),
        StepOptions(batch_size=40),  # many full, LIMIT-bounded batches and plain windows
        StepOptions(batch_size=300, target_batch_ms=None),  # fixed batches
        StepOptions(batch_size=1, target_batch_ms=None),
    ],
    ids=["default", "small", "fixed", "one"],
)
def test_every_path_and_batch_size_leaves_the_contract_state(
    app_url: str, options: StepOptions
) -> None:
    engine = pg.engine(app_url)
    seed_database(engine, 400, anchor=T, create_schema=False)
    dry = {
        name: getattr(steps, name)(engine, T, StepOptions(dry_run=True)).changed
        for name in ("expire_sessions", "purge_declines", "remove_orphan_fingerprints")
    }
    before = pg.snapshot(app_url)
    real = {
        name: getattr(steps, name)(engine, T, options).changed
        for name in ("expire_sessions", "purge_declines", "remove_orphan_fingerprints")
    }
    engine.dispose()
    assert pg.snapshot(app_url) == model.cleanup(before, T)
    assert real == dry


def test_safety_cap_on_a_heap_walk_commits_nothing_past_max_rows(app_url: str) -> None:
    engine = pg.engine(app_url)
    seed_database(engine, 400, anchor=T, create_schema=False)
    due = steps.purge_declines(engine, T, StepOptions(dry_run=True)).changed
    with pytest.raises(steps.SafetyCapExceeded) as raised:
        steps.purge_declines(engine, T, StepOptions(max_rows=due - 1))
    left = steps.purge_declines(engine, T, StepOptions(dry_run=True)).changed
    engine.dispose()
    assert raised.value.changed <= due - 1
    assert due - left == raised.value.changed


@pytest.mark.parametrize("batch_size", [1, 2, 3, 50_000])
def test_orphan_walk_takes_every_fingerprint_of_a_session_whatever_the_batch_size(
    app_url: str, batch_size: int
) -> None:
    # Fingerprints sharing a session id sit side by side in the session_id index, so a
    # range ending inside such a run must take the rest of it, or skip it.
    data.boundaries(app_url)
    hour = timedelta(hours=1)
    _insert_orphans(app_url, 40, per_session=4, age=lambda n: (1 + n % 3) * hour)
    for n in range(40):
        live = data.uid(102) if n % 2 else None  # a live session, and no session at all
        data.insert_fingerprint(app_url, data.uid(920_000 + n), live, T - 5 * hour)
    before = pg.snapshot(app_url)
    # Pass 1 walks the fingerprints, pass 2 the orphaned session ids it found.
    assert _units(app_url, "remove_orphan_fingerprints", StepOptions(dry_run=True)) == {
        "fingerprints",
        "orphaned session ids",
    }
    engine = pg.engine(app_url)
    try:
        result = steps.remove_orphan_fingerprints(engine, T, StepOptions(batch_size=batch_size))
    finally:
        engine.dispose()
    expected = model.remove_orphan_fingerprints(before, T)
    assert pg.snapshot(app_url) == expected
    assert result.changed == len(before["device_fingerprints"]) - len(
        expected["device_fingerprints"]
    )


def _orphans_with_a_session_arriving(
    url: str, arrived: Any, unit: str, batch_size: int
) -> tuple[steps.StepResult, pg.Snapshot]:
    """Run the orphan step; before its first batch in ``unit`` (pass 2), the app inserts
    session ``arrived``. Returns the result and the whole state just after the insert."""
    at_pass_2: list[pg.Snapshot] = []

    def before_batch(progress: steps.Progress) -> None:
        if progress.unit == unit and not at_pass_2:
            hour = timedelta(hours=1)
            data.insert_session(url, arrived, "u8", T - hour, ended_at=T - hour)
            at_pass_2.append(pg.snapshot(url))

    engine = pg.engine(url)
    try:
        result = steps.remove_orphan_fingerprints(
            engine, T, StepOptions(batch_size=batch_size), before_batch=before_batch
        )
    finally:
        engine.dispose()
    [state] = at_pass_2
    return result, state


@pytest.mark.parametrize("batch_size", [1, 50_000])
def test_orphan_walk_rechecks_each_row_when_it_deletes(app_url: str, batch_size: int) -> None:
    # Pass 1 finds the missing sessions; by pass 2 one of them exists (the app inserted it),
    # so its fingerprints are no longer orphans and must stay.
    data.boundaries(app_url)
    hour = timedelta(hours=1)
    _insert_orphans(app_url, 12, per_session=3, age=lambda n: 2 * hour)
    result, state = _orphans_with_a_session_arriving(
        app_url, data.uid(900_001), "orphaned session ids", batch_size
    )
    assert pg.snapshot(app_url) == model.remove_orphan_fingerprints(state, T)
    kept = {row["id"] for row in pg.snapshot(app_url)["device_fingerprints"]}
    assert {data.uid(910_003), data.uid(910_004), data.uid(910_005)} <= kept
    # The other three missing sessions' nine, and the two old orphans of data.boundaries.
    assert result.changed == 9 + 2


class _Stop(BaseException):
    """What Dagster raises in an op it stops: not an Exception."""


@pytest.mark.parametrize("stop_in", ["fingerprints", "orphaned session ids"])
def test_orphan_walk_stopped_in_either_pass_leaves_whole_batches_and_no_temporary_table(
    app_url: str, stop_in: str
) -> None:
    data.boundaries(app_url)
    _insert_orphans(app_url, 40, per_session=4, age=lambda n: timedelta(hours=2))
    before = pg.snapshot(app_url)
    calls: list[str] = []

    def before_batch(progress: steps.Progress) -> None:
        calls.append(progress.unit)
        if calls.count(stop_in) == 3:
            raise _Stop

    engine = pg.engine(app_url)
    try:
        # Keeping the traceback keeps the walk alive: its connection cannot slip back into
        # the pool through the garbage collector, only through the walk's own cleanup.
        with pytest.raises(_Stop) as raised:
            steps.remove_orphan_fingerprints(
                engine, T, StepOptions(batch_size=2), before_batch=before_batch
            )
        assert raised.traceback
        with engine.connect() as conn:
            left = conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_class WHERE relname = 'session_cleanup_orphan_ids'"
                )
            ).scalar_one()
        assert left == 0, "the walk left its temporary table (and its connection) behind"
        stopped = pg.snapshot(app_url)
        full = model.remove_orphan_fingerprints(before, T)
        ids = {name: {row["id"] for row in rows} for name, rows in before.items()}
        kept = {row["id"] for row in stopped["device_fingerprints"]}
        gone = ids["device_fingerprints"] - kept
        assert gone <= ids["device_fingerprints"] - {r["id"] for r in full["device_fingerprints"]}
        if stop_in == "fingerprints":
            assert stopped == before  # the first pass changes nothing
        else:
            # Two committed batches of two found session ids each, in key order: exactly
            # the due orphans of the first four ids that name no session.
            found = sorted(_missing_session_ids(before))
            due = ids["device_fingerprints"] - {r["id"] for r in full["device_fingerprints"]}
            assert gone == {
                row["id"]
                for row in before["device_fingerprints"]
                if row["session_id"] in found[:4] and row["id"] in due
            }
            assert gone
        assert {k: v for k, v in stopped.items() if k != "device_fingerprints"} == {
            k: v for k, v in before.items() if k != "device_fingerprints"
        }
        steps.remove_orphan_fingerprints(engine, T)  # the next run finishes
    finally:
        engine.dispose()
    assert pg.snapshot(app_url) == full


def _run_chooser(chooser: _Chooser, rates: dict[str, float], batches: int) -> list[str]:
    """Plans the chooser picks for ``batches`` batches that run at ``rates`` units/s."""
    ran = []
    for _ in range(batches):
        plan, size = chooser.next()
        if plan != chooser.best:
            # A batch of the slower plan is never larger than the faster one's batches.
            assert size <= chooser.paces[chooser.best].size
        ran.append(plan)
        chooser.observe(plan, size, size / rates[plan])
    return ran


def test_chooser_runs_the_faster_plan_and_retries_the_other_ever_less_often() -> None:
    chooser = _Chooser(("probe", "merge"), 1000, 50_000, 0.1)
    ran = _run_chooser(chooser, {"probe": 100_000.0, "merge": 200_000.0}, 40)
    # Each plan once, at the same size; then the faster, with the slower after 2, 4, 8,
    # 16 and 16 batches of it.
    assert ran[:2] == ["probe", "merge"]
    assert [n for n, plan in enumerate(ran) if plan == "probe"] == [0, 4, 9, 18, 35]
    # One slow batch of the faster plan (a checkpoint, say) does not swap plans by itself.
    plan, size = chooser.next()
    assert plan == "merge"
    chooser.observe(plan, size, size / 80_000.0)
    assert chooser.best == "merge"

    # The slower plan's next batch finds it faster now: it takes over, and the retries of
    # the other start again at every 2 batches.
    ran = _run_chooser(chooser, {"probe": 400_000.0, "merge": 200_000.0}, 40)
    after = ran[ran.index("probe") :]
    assert [n for n, plan in enumerate(after) if plan == "merge"][:3] == [3, 8, 17]


def test_orphan_walk_finds_the_same_ids_with_either_plan_of_pass_one(app_url: str) -> None:
    # Pass 1 joins each key range with the sessions' primary key by probing it per key or
    # by merging (the walk measures which is faster). Forced to one plan for the whole pass,
    # each must find exactly the session ids no session has, and run as the plan it names.
    data.boundaries(app_url)
    _insert_orphans(app_url, 40, per_session=4, age=lambda n: timedelta(hours=2))
    for n in range(30):
        data.insert_fingerprint(app_url, data.uid(920_000 + n), data.uid(102), T)
    before = pg.snapshot(app_url)
    missing = _missing_session_ids(before)
    engine = pg.engine(app_url)
    try:
        for plan, join in [("probe", "Nested Loop Anti Join"), ("merge", "Merge Anti Join")]:
            walk = orphans._orphan_walk(engine, T, StepOptions(), timedelta(hours=1), "public")
            walk.find = _Chooser((plan, plan), 3, 3, None)  # this plan, 3 keys a batch
            with engine.connect() as conn:
                walk.start(conn)
            try:
                while not walk.deleting:
                    walk.run_batch(engine, 3, True, 0, lambda changed: None)
                own = walk._own()
                temporary = sa.text("SELECT id FROM pg_temp.session_cleanup_orphan_ids")
                found = {str(row.id) for row in own.execute(temporary)}
                own.rollback()
                assert found == {str(i) for i in missing}, plan
                assert (
                    walk.find.runs[plan] > 3
                    and sum(walk.find.runs.values()) == (walk.find.runs[plan])
                )
                with own.begin():
                    loop._begin_batch(own, walk.FIND_PLANS[plan])
                    statement = walk._find(10, plan).compile(
                        dialect=engine.dialect, compile_kwargs={"literal_binds": True}
                    )
                    shown = "\n".join(row[0] for row in own.exec_driver_sql(f"EXPLAIN {statement}"))
            finally:
                walk.finish()
            assert join in shown, shown
            assert "Seq Scan" not in shown, shown
    finally:
        engine.dispose()
    assert pg.snapshot(app_url) == before


@pytest.mark.parametrize("batch_size", [1, 3, 50_000])
def test_orphan_walk_s_second_pass_through_the_heap_keeps_the_contract(
    app_url: str, batch_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where few session ids were found (a steady night), pass 2 walks the fingerprints'
    # heap once instead of descending the index per id. Forced here on a small table: it
    # must delete exactly what the contract says, re-checking each row (a session that
    # arrives during pass 2 saves its fingerprints), and count in a dry run what it deletes.
    monkeypatch.setattr(orphans, "HEAP_PASS_MIN_PAGES", 0)
    data.boundaries(app_url)
    hour = timedelta(hours=1)
    _insert_orphans(app_url, 40, per_session=4, age=lambda n: (n % 3) * hour)
    for n in range(40):
        live = data.uid(102) if n % 2 else None  # a live session, and no session at all
        data.insert_fingerprint(app_url, data.uid(920_000 + n), live, T - 5 * hour)
    pg.execute(app_url, "ANALYZE")
    assert _units(app_url, "remove_orphan_fingerprints", StepOptions(dry_run=True)) == {
        "fingerprints",
        "pages",
    }
    engine = pg.engine(app_url)
    try:
        dry = steps.remove_orphan_fingerprints(engine, T, StepOptions(dry_run=True)).changed
    finally:
        engine.dispose()
    # The session of orphans 12-15 (two of them due) arrives.
    result, state = _orphans_with_a_session_arriving(
        app_url, data.uid(900_003), "pages", batch_size
    )
    expected = model.remove_orphan_fingerprints(state, T)
    assert pg.snapshot(app_url) == expected
    assert data.uid(910_014) in {row["id"] for row in expected["device_fingerprints"]}
    # Orphan 14 (2 hours old) was due when the dry run counted; its session arrived since.
    assert result.changed == dry - 1
    assert result.changed == len(state["device_fingerprints"]) - len(
        expected["device_fingerprints"]
    )
