"""Property tests: Hypothesis datasets, real runs on PostgreSQL, compared row by row to the model.

Touches: session_cleanup_dagster.steps (and, for fewer examples, the whole job through
execute_in_process) on one database per test function; the four tables are emptied at the
start of every example. Hypothesis generates small datasets for all four tables around the
boundaries of the contract: timestamps exactly at T, T - retention and T - grace and one
microsecond either side, NULLs wherever the schema allows them, cutoffs at month and year
boundaries (so T - retention crosses one), and a session the app deletes between two steps
(its declines cascade away, its fingerprints become orphans). Each step runs with a batch
size from 1 up, dry run on or off. After every step the whole database must equal
tests.model's prediction, every column of every row of every table, and the step's count
must equal the number of rows the model changed.

The database's TimeZone is set far from UTC (Pacific/Chatham, +12:45/+13:45), so a timezone
slip anywhere between Python, psycopg and the server would show as a wrong row.

Example counts come from the Hypothesis profile (tests/conftest.py): "ci" runs 200 per
property, HYPOTHESIS_PROFILE=long runs 5000.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from hypothesis import given, note, settings
from hypothesis import strategies as st

from session_cleanup_dagster import steps
from session_cleanup_dagster.steps import StepOptions
from tests import model, pg
from tests.jobrun import OPS, output_metadata, run_job

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
# pytest-timeout's 600 s suits the ci profile; the long one runs for tens of minutes a test.
pytestmark = [pytest.mark.timeout(600 if PROFILE == "ci" else 4 * 3600), pytest.mark.slow]

MICRO = timedelta(microseconds=1)
DEFAULT_RETENTION = timedelta(days=7)
DEFAULT_GRACE = timedelta(hours=1)
DEFAULT_RETENTION_ONLY = st.just(DEFAULT_RETENTION)
DEFAULT_GRACE_ONLY = st.just(DEFAULT_GRACE)
USERS = ("u0", "u1", "u2", "u3", "u4", "u5")
TABLE_OF = {
    "expire_sessions": "after_hours_sessions",
    "purge_declines": "after_hours_declines",
    "remove_orphan_fingerprints": "device_fingerprints",
}

# Cutoffs on and next to month and year boundaries (and a leap day), plus ordinary ones.
BOUNDARY_CUTOFFS = [
    datetime(2026, 1, 1, tzinfo=UTC),
    datetime(2026, 1, 1, tzinfo=UTC) - MICRO,
    datetime(2026, 1, 3, 4, tzinfo=UTC),  # T - 7 days is in the previous year
    datetime(2026, 3, 1, tzinfo=UTC),
    datetime(2024, 3, 1, 0, 30, tzinfo=UTC),  # T - 1 hour is on a leap day
    datetime(2026, 11, 1, 0, 59, 59, 999999, tzinfo=UTC),
    datetime(2026, 11, 28, 4, tzinfo=UTC),
    datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC),
]


def uid(n: int) -> uuid.UUID:
    return uuid.UUID(int=n)


@dataclass(frozen=True)
class Dataset:
    cutoff: datetime
    retention: timedelta
    grace: timedelta
    sessions: list[tuple[Any, ...]]
    declines: list[tuple[Any, ...]]
    fingerprints: list[tuple[Any, ...]]


@dataclass(frozen=True)
class Plan:
    order: tuple[str, ...]
    options: dict[str, StepOptions]
    delete_after: int | None  # delete a session after this many steps (None: never)
    delete_index: int  # which session (modulo how many there are)
    earlier: timedelta  # a second run at T - earlier must change nothing


def cutoffs(latest: datetime | None = None) -> st.SearchStrategy[datetime]:
    start, end = datetime(2020, 1, 1), datetime(2030, 12, 31)
    boundary = BOUNDARY_CUTOFFS
    if latest is not None:
        end = latest.replace(tzinfo=None)
        boundary = [c for c in BOUNDARY_CUTOFFS if c <= latest]
    return st.one_of(
        st.sampled_from(boundary),
        st.datetimes(min_value=start, max_value=end, timezones=st.just(UTC)),
    )


def instants(anchors: list[datetime]) -> st.SearchStrategy[datetime]:
    """An instant on or next to one of the anchors, or anywhere within about a month."""
    near = st.sampled_from(
        [timedelta(0), MICRO, -MICRO, timedelta(seconds=1), -timedelta(seconds=1)]
    )
    far = st.timedeltas(min_value=-timedelta(days=40), max_value=timedelta(days=40))
    return st.builds(lambda a, d: a + d, st.sampled_from(anchors), st.one_of(near, near, far))


@st.composite
def datasets(
    draw: st.DrawFn,
    *,
    retention: st.SearchStrategy[timedelta] = DEFAULT_RETENTION_ONLY,
    grace: st.SearchStrategy[timedelta] = DEFAULT_GRACE_ONLY,
    latest_cutoff: datetime | None = None,
) -> Dataset:
    cutoff = draw(cutoffs(latest_cutoff))
    keep = draw(retention)
    spare = draw(grace)
    month = cutoff.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    anchors = [cutoff, cutoff - keep, cutoff - spare, month, month.replace(month=1)]
    when = instants(anchors)

    sessions: list[tuple[Any, ...]] = []
    open_users: set[str] = set()
    for n in range(draw(st.integers(0, 8))):
        user = draw(st.sampled_from(USERS))
        expires_at = draw(when)
        ended_at = draw(st.none() | when)
        if ended_at is None and user in open_users:
            ended_at = expires_at  # one open session per user (a unique index)
        if ended_at is None:
            open_users.add(user)
        started_at = draw(st.none() | when)
        created_at = draw(st.none() | when)
        sessions.append((uid(100 + n), user, started_at, expires_at, ended_at, created_at))

    session_ids = [row[0] for row in sessions]
    ghosts = [uid(900 + n) for n in range(3)]  # ids no session has

    declines: list[tuple[Any, ...]] = []
    pairs: set[tuple[str, str]] = set()
    if session_ids:
        for n in range(draw(st.integers(0, 8))):
            user, declined = draw(st.sampled_from(USERS)), draw(st.sampled_from(USERS))
            if (user, declined) in pairs:
                continue  # unique (user_id, declined_user_id)
            pairs.add((user, declined))
            declines.append(
                (
                    uid(200 + n),
                    draw(st.sampled_from(session_ids)),
                    user,
                    declined,
                    draw(st.none() | when),
                    draw(st.none() | st.integers(1, 5)),
                    draw(st.none() | when),
                    draw(st.none() | st.sampled_from(session_ids + ghosts)),
                )
            )

    fingerprints: list[tuple[Any, ...]] = []
    for n in range(draw(st.integers(0, 8))):
        fingerprints.append(
            (
                uid(300 + n),
                draw(st.none() | st.sampled_from(USERS)),
                draw(st.none() | st.sampled_from(session_ids + ghosts)),
                f"hash-{n}",
                draw(st.none() | when),
            )
        )
    return Dataset(cutoff, keep, spare, sessions, declines, fingerprints)


def step_options(max_batch: int = 10) -> st.SearchStrategy[StepOptions]:
    return st.builds(
        StepOptions,
        batch_size=st.one_of(st.integers(1, max_batch), st.just(1000)),
        dry_run=st.booleans(),
    )


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    order = tuple(draw(st.permutations(list(TABLE_OF))))
    options = {name: draw(step_options()) for name in order}
    delete_after = draw(st.none() | st.integers(0, 2))
    return Plan(
        order=order,
        options=options,
        delete_after=delete_after,
        delete_index=draw(st.integers(0, 7)),
        earlier=draw(st.sampled_from([timedelta(0), MICRO, timedelta(days=3)])),
    )


# --- the database side ----------------------------------------------------------------------


@dataclass
class PropertyDB:
    url: str
    engine: sa.Engine
    conn: psycopg.Connection[Any]  # autocommit; for loading, snapshots and the app's deletes

    def snapshot(self) -> pg.Snapshot:
        return pg.snapshot_on(self.conn)


@pytest.fixture
def property_db(app_url: str) -> Iterator[PropertyDB]:
    """This test function's database, in a TimeZone far from UTC, and an engine like the job's."""
    name = pg.database_name(app_url)
    pg.execute(app_url, f"ALTER DATABASE \"{name}\" SET timezone = 'Pacific/Chatham'")
    engine = pg.engine(app_url)
    try:
        with psycopg.connect(app_url, autocommit=True) as conn:
            yield PropertyDB(app_url, engine, conn)
    finally:
        engine.dispose()


def load(db: PropertyDB, data: Dataset) -> None:
    """Empty the four tables and insert the dataset, in one transaction.

    DELETE, not TRUNCATE: on a handful of rows TRUNCATE costs ten times more (new files, a
    sync each), and the rows of earlier examples left as dead tuples spread each example's
    rows over more pages, which the heap walk has to cross.
    """
    with db.conn.transaction():
        for table in reversed(pg.TABLES):
            db.conn.execute(f"DELETE FROM {table}".encode())
        with db.conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO users (id, created_at) VALUES (%s, %s)",
                [(user, data.cutoff - timedelta(days=100)) for user in USERS],
            )
            cur.executemany(
                "INSERT INTO after_hours_sessions (id, user_id, started_at, expires_at, ended_at,"
                " latitude, longitude, fuzzed_latitude, fuzzed_longitude, created_at)"
                " VALUES (%s, %s, %s, %s, %s, 52.52000660, 13.40495400, 52.5210, 13.4050, %s)",
                data.sessions,
            )
            cur.executemany(
                "INSERT INTO after_hours_declines (id, session_id, user_id, declined_user_id,"
                " created_at, decline_count, first_declined_at, last_session_id)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                data.declines,
            )
            cur.executemany(
                "INSERT INTO device_fingerprints (id, user_id, session_id, fingerprint_hash,"
                " created_at) VALUES (%s, %s, %s, %s, %s)",
                data.fingerprints,
            )


def real_step(
    name: str, engine: sa.Engine, data: Dataset, cutoff: datetime, options: StepOptions
) -> steps.StepResult:
    if name == "purge_declines":
        return steps.purge_declines(engine, cutoff, options, retention=data.retention)
    if name == "remove_orphan_fingerprints":
        return steps.remove_orphan_fingerprints(engine, cutoff, options, grace=data.grace)
    return steps.expire_sessions(engine, cutoff, options)


def model_step(name: str, state: pg.Snapshot, data: Dataset) -> pg.Snapshot:
    if name == "purge_declines":
        return model.purge_declines(state, data.cutoff, data.retention)
    if name == "remove_orphan_fingerprints":
        return model.remove_orphan_fingerprints(state, data.cutoff, data.grace)
    return model.expire_sessions(state, data.cutoff)


def run_plan(db: PropertyDB, data: Dataset, plan: Plan) -> None:
    """Run the steps in the plan's order, checking the whole state after each one."""
    engine = db.engine
    state = db.snapshot()
    for position, name in enumerate(plan.order):
        if plan.delete_after == position and state["after_hours_sessions"]:
            sessions = state["after_hours_sessions"]
            victim = sessions[plan.delete_index % len(sessions)]["id"]
            note(f"the app deletes session {victim} before {name}")
            db.conn.execute("DELETE FROM after_hours_sessions WHERE id = %s", (victim,))
            state = model.delete_session(state, victim)
            assert db.snapshot() == state
        options = plan.options[name]
        result = real_step(name, engine, data, data.cutoff, options)
        predicted = model_step(name, state, data)
        should_change = model.rows_changed(state, predicted, TABLE_OF[name])
        after = db.snapshot()
        assert result.changed == should_change, (name, options)
        if options.dry_run:
            assert after == state, (name, "a dry run changed something")
            assert len(result.sample_ids) == min(should_change, steps.SAMPLE_SIZE)
        else:
            assert after == predicted, (name, options)
            state = after
    # The rest of the work (dry-run steps, orphans the deletion made) in one real pass...
    for name in plan.order:
        real_step(name, engine, data, data.cutoff, StepOptions(batch_size=3))
    final = db.snapshot()
    assert final == model.cleanup(state, data.cutoff, data.retention, data.grace)
    # ...after which the same T again, or an earlier T, changes nothing (idempotent, monotone).
    for name in plan.order:
        again = real_step(name, engine, data, data.cutoff - plan.earlier, plan.options[name])
        assert again.changed == 0, (name, "a second run found rows to change")
    assert db.snapshot() == final


# --- the properties -------------------------------------------------------------------------


@given(data=datasets(), plan=plans())
def test_steps_leave_exactly_the_state_the_model_predicts(
    property_db: PropertyDB, data: Dataset, plan: Plan
) -> None:
    load(property_db, data)
    run_plan(property_db, data, plan)


@given(
    data=datasets(
        retention=st.one_of(
            st.sampled_from([timedelta(days=1), timedelta(days=31), timedelta(days=365)]),
            st.integers(1, 3650).map(lambda d: timedelta(days=d)),
        ),
        grace=st.one_of(
            st.sampled_from([timedelta(minutes=1), timedelta(days=1), timedelta(days=7)]),
            st.integers(1, 10080).map(lambda m: timedelta(minutes=m)),
        ),
    ),
    plan=plans(),
)
def test_non_default_retention_and_grace_leave_the_state_the_model_predicts(
    property_db: PropertyDB, data: Dataset, plan: Plan
) -> None:
    load(property_db, data)
    run_plan(property_db, data, plan)


def _cap_options() -> st.SearchStrategy[StepOptions]:
    return st.builds(StepOptions, batch_size=st.integers(1, 4), max_rows=st.integers(1, 6))


@given(data=datasets(), name=st.sampled_from(list(TABLE_OF)), options=_cap_options())
def test_safety_cap_never_lets_a_step_pass_max_rows_and_keeps_batches_whole(
    property_db: PropertyDB, data: Dataset, name: str, options: StepOptions
) -> None:
    db = property_db
    engine = db.engine
    load(db, data)
    before = db.snapshot()
    predicted = model_step(name, before, data)
    due = model.rows_changed(before, predicted, TABLE_OF[name])
    assert options.max_rows is not None
    try:
        result = real_step(name, engine, data, data.cutoff, options)
    except steps.SafetyCapExceeded as exc:
        assert due > options.max_rows
        assert exc.changed <= options.max_rows < exc.changed + exc.next_batch
        changed = exc.changed
    else:
        assert due <= options.max_rows
        assert result.changed == due
        changed = due
    after = db.snapshot()
    table = TABLE_OF[name]
    # Exactly `changed` rows changed, each one as the model says; no other table moved.
    assert model.rows_changed(before, after, table) == changed
    expected_rows = {row["id"]: row for row in predicted[table]}
    for row in after[table]:
        old = next(r for r in before[table] if r["id"] == row["id"])
        assert row in (old, expected_rows.get(row["id"]))
    for other in pg.TABLES:
        if other != table:
            assert after[other] == before[other]


JOB_EXAMPLES = {"ci": 25, "long": 500}
_JOB_LATEST_CUTOFF = datetime(2026, 11, 1, tzinfo=UTC)  # as_of may not be in the future


@settings(max_examples=JOB_EXAMPLES.get(PROFILE, 25))
@given(
    data=datasets(
        retention=st.integers(1, 60).map(lambda d: timedelta(days=d)),
        grace=st.integers(1, 600).map(lambda m: timedelta(minutes=m)),
        latest_cutoff=_JOB_LATEST_CUTOFF,
    ),
    options=st.fixed_dictionaries({name: step_options() for name in TABLE_OF}),
)
def test_whole_job_leaves_the_state_the_model_predicts(
    property_db: PropertyDB, data: Dataset, options: dict[str, StepOptions]
) -> None:
    db = property_db
    load(db, data)
    before = db.snapshot()
    config: dict[str, dict[str, Any]] = {
        op: {
            "as_of": data.cutoff.isoformat(),
            "batch_size": options[op].batch_size,
            "dry_run": options[op].dry_run,
        }
        for op in OPS
    }
    config["purge_declines"]["retention_days"] = data.retention.days
    config["remove_orphan_fingerprints"]["grace_minutes"] = int(data.grace.total_seconds() // 60)
    result = run_job(db.url, op_config=config)
    assert result.success
    expected = before
    for op in OPS:
        predicted = model_step(op, before, data)
        meta = output_metadata(result, op)
        assert meta["rows_matched"] == model.rows_changed(before, predicted, TABLE_OF[op])
        assert datetime.fromisoformat(meta["cutoff_iso"]) == data.cutoff
        if not options[op].dry_run:
            expected = model_step(op, expected, data)
    assert db.snapshot() == expected
