"""remove_orphan_fingerprints: find the orphans' session ids, then delete by key."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, ClassVar

import sqlalchemy as sa
import sqlalchemy.exc

from session_cleanup_dagster import tables as t
from session_cleanup_dagster.contract import GRACE
from session_cleanup_dagster.steps.loop import (
    FIRST_BATCH,
    BeforeBatch,
    CapCheck,
    Progress,
    StepOptions,
    StepResult,
    _Batch,
    _begin_batch,
    _Chooser,
    _is_lock_conflict,
    _Pace,
    _sample_array,
    _target_s,
    _transaction,
    _walk,
)


class _OrphanWalk:
    """Two passes over the index on ``session_id``: find the missing sessions, then delete.

    The one-statement limit finds orphans with a hash anti-join that reads every session once.
    A batch cannot do that (it would read every session once per batch). Probing the sessions'
    primary key for each fingerprint in physical order (a heap walk) touches its leaf pages
    at random, and measured at a third of the limit's rows/s. Taken in ``session_id`` order,
    the probes walk the primary key from left to right, an index-only scan on both sides.

    That holds only while the fingerprints' visibility map is intact: every delete clears
    its page's bit, orphans sit on most pages, so a walk that deletes as it goes soon pays a
    random heap fetch for every fingerprint it reads (measured at L: the reading half of
    each batch became 44 % of its time). So the walk makes two passes, both in key order, on
    one connection of its own:

    1. **Find** (read-only). Each batch reads the next ``limit`` keys of the index after the
       last batch's, probes the primary key for them, and appends the session ids no session
       has to a temporary table (server-side, on this connection; the client holds no ids).
    2. **Delete.** Each batch takes the next ``limit`` of those ids in key order and deletes
       every due fingerprint of theirs in one statement, re-checking the whole condition on
       each row (a session inserted since pass 1 saves its fingerprints). Deleting by session
       id takes every fingerprint of a session in the same batch. The statement runs under a
       short ``lock_timeout``; if the app holds one of its rows locked, it is redone locking
       rows ``FOR UPDATE SKIP LOCKED`` (locked rows are left for the next run).

    Every batch is its own transaction and changes nothing but whole batches; the temporary
    table dies with the connection, so a cancel or crash at any instant costs the next run
    nothing but pass 1 again. Plans are pinned (``SET LOCAL``) to index ranges: a seq scan
    or hash join, which the planner may prefer for a large range, reads a whole table per
    batch.

    Pass 1 has two ways to join its range with the primary key, and each is faster in its
    turn, so the walk measures both and runs the faster (``_Chooser``):

    - **probe**: a nested loop, one descent of the primary key per key of the range;
    - **merge**: one scan of the primary key from the range's first key to its last. It
      reads every session in between (3.3 per fingerprint in the reference data), which is
      cheaper than the descents while those sessions' pages are all-visible, and dearer when
      not (each then costs a heap fetch; so after an ``expire_sessions`` that ended many
      sessions, until vacuum).

    Pass 2 probes the primary key per row: its ids are sparse in the key space.

    Measured at L (single runs on identical copies; benchmarks/README.md): the one-statement
    limit 3.2-3.6 s, one pass deleting as it goes 5.3-5.8 s, these two passes 3.9-4.0 s with
    probes alone.

    Needs an index that leads with ``session_id`` (the step's prerequisites check for it)
    and the TEMPORARY privilege on the database (granted to PUBLIC by default).
    """

    # Planner settings turned off for each plan (SET LOCAL, per batch).
    PROBE = ("enable_seqscan", "enable_hashjoin", "enable_mergejoin")
    MERGE = ("enable_seqscan", "enable_hashjoin", "enable_nestloop")
    # Pass 1's two plans for joining a key range with the sessions' primary key.
    FIND_PLANS: ClassVar[dict[str, tuple[str, ...]]] = {"probe": PROBE, "merge": MERGE}

    def __init__(
        self,
        engine: sa.Engine,
        table: sa.Table,
        sessions: sa.Table,
        condition: Sequence[sa.ColumnElement[bool]],
        options: StepOptions,
    ) -> None:
        self.engine = engine
        self.table = table
        self.sessions = sessions
        self.key = table.c.session_id
        self.condition = list(condition)
        self.found = sa.Table(
            "session_cleanup_orphan_ids",
            sa.MetaData(),
            sa.Column("id", self.key.type, primary_key=True),
            schema="pg_temp",
        )
        self.conn: sa.Connection | None = None
        self.deleting = False
        self.low: Any = None  # pass 1: every key up to here (inclusive) is done
        self.last: Any = None  # pass 2: every found id up to here (inclusive) is done
        self.seen = 0
        self.total: int | None = None
        self.missing = 0
        self.done = 0
        self.deleting_since: float | None = None
        self.find = _Chooser(
            ("probe", "merge"), FIRST_BATCH, options.batch_size, _target_s(options)
        )
        self.pace = _Pace(FIRST_BATCH, options.batch_size, _target_s(options))

    def start(self, conn: sa.Connection) -> None:
        tuples, _ = t.planner_estimate(conn, self.table)
        self.total = int(tuples) if tuples > 0 else None

    def _own(self) -> sa.Connection:
        """The walk's own connection, holding the temporary table; opened on first use.

        Not in ``start``: that would hold two of the engine's connections at once.
        """
        if self.conn is None:
            own = self.engine.connect()
            try:
                own.execute(sa.text(f"DROP TABLE IF EXISTS {_temp_name(self.found)}"))
                self.found.create(own)
                own.commit()
            except BaseException:
                own.close()
                raise
            self.conn = own
        return self.conn

    def finish(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        try:
            if not conn.invalidated:
                conn.rollback()
                conn.execute(sa.text(f"DROP TABLE IF EXISTS {_temp_name(self.found)}"))
                conn.commit()
        except Exception:
            # Never mask how the walk ended: a connection that is dropped instead of returned
            # to the pool takes its temporary table with it.
            conn.invalidate()
        finally:
            conn.close()

    def _find(self, limit: int, plan: str) -> sa.Select[Any]:
        """Pass 1's batch: its keys, their missing sessions appended to the temporary table.

        Returns one row: how many keys the range holds, its last key, how many ids it found.
        """
        key = self.key
        keys = sa.select(key.label("k")).where(key.is_not(None))
        if self.low is not None:
            keys = keys.where(key > self.low)
        # The next ``limit`` keys of the index (index-only: nothing has been deleted yet),
        # read once. MATERIALIZED: it is read three times below. The range can end inside a
        # session's fingerprints; the next starts after that key, which is recorded already.
        rng = keys.order_by(key).limit(limit).cte("range").prefix_with("MATERIALIZED")
        sessions = self.sessions
        session = sa.select(sessions.c.id).where(sessions.c.id == rng.c.k)
        if plan == "merge" and self.low is not None:
            # Redundant for the result (every key of the range is past low), but where the
            # merge starts its scan of the primary key; it stops after the range's last key.
            session = session.where(sessions.c.id > self.low)
        missing = sa.select(rng.c.k).where(~session.exists()).distinct()
        added = (
            sa.insert(self.found)
            .from_select(["id"], missing)
            .returning(self.found.c.id)
            .cte("added")
        )
        last = sa.select(rng.c.k).order_by(rng.c.k.desc()).limit(1).scalar_subquery()
        return sa.select(
            sa.select(sa.func.count()).select_from(rng).scalar_subquery(),
            last,
            sa.select(sa.func.count()).select_from(added).scalar_subquery(),
        )

    def _delete(self, limit: int, dry_run: bool, careful: bool, want: int) -> sa.Select[Any]:
        """Pass 2's batch: the next ``limit`` found ids, and the change to their fingerprints.

        Returns one row: how many ids the batch took, its last id, how many rows were changed
        (or, dry, matched) and up to ``want`` of their ids.
        """
        f, found = self.table, self.found
        ids = sa.select(found.c.id)
        if self.last is not None:
            ids = ids.where(found.c.id > self.last)
        chunk = ids.order_by(found.c.id).limit(limit).cte("chunk").prefix_with("MATERIALIZED")
        # Every due fingerprint of those sessions, with the whole condition checked on each
        # row as it is deleted (a session inserted since pass 1 keeps its fingerprints).
        where = [
            self.key == sa.any_(sa.func.array(sa.select(chunk.c.id).scalar_subquery())),
            *self.condition,
        ]
        if dry_run:
            source: Any = sa.select(f.c.id).where(*where).cte("matched")
        elif careful:
            locked = (
                sa.select(f.c.id)
                .where(*where)
                .with_for_update(skip_locked=True, of=f)
                .cte("locked")
            )
            source = (
                sa.delete(f)
                .where(f.c.id.in_(sa.select(locked.c.id)), *where)
                .returning(f.c.id)
                .cte("deleted")
            )
        else:
            source = sa.delete(f).where(*where).returning(f.c.id).cte("deleted")
        last = sa.select(chunk.c.id).order_by(chunk.c.id.desc()).limit(1).scalar_subquery()
        return sa.select(
            sa.select(sa.func.count()).select_from(chunk).scalar_subquery(),
            last,
            sa.select(sa.func.count()).select_from(source).scalar_subquery(),
            _sample_array(source, want),
        )

    def run_batch(
        self, engine: sa.Engine, cap: int, dry_run: bool, want_samples: int, check: CapCheck
    ) -> _Batch:
        own = self._own()
        if not self.deleting:
            return self._run_find(own)
        limit = min(self.pace.size, cap)
        careful = False
        while True:
            started = time.monotonic()
            try:
                with _transaction(own) as conn:
                    _begin_batch(conn, self.PROBE)
                    statement = self._delete(limit, dry_run, careful, want_samples)
                    taken, last, changed, samples = conn.execute(statement).one()
                    if not dry_run:
                        check(changed)
            except sa.exc.OperationalError as exc:
                if careful or not _is_lock_conflict(exc):
                    raise
                # The app holds one of the batch's rows: redo it, skipping that row.
                careful = True
                continue
            break
        self.pace.observe(int(taken), time.monotonic() - started)
        self.done += int(taken)
        if last is not None:
            self.last = last
        return _Batch(int(changed), [str(i) for i in samples or []], taken >= limit)

    def _run_find(self, own: sa.Connection) -> _Batch:
        plan, limit = self.find.next()
        started = time.monotonic()
        with _transaction(own) as conn:
            _begin_batch(conn, self.FIND_PLANS[plan])
            seen, last, added = conn.execute(self._find(limit, plan)).one()
        self.find.observe(plan, int(seen), time.monotonic() - started)
        self.seen += int(seen)
        self.missing += int(added)
        if last is not None:
            self.low = last
        if seen < limit:
            # Pass 1 is done: pass 2 deletes, if there is anything to delete.
            self.deleting = True
            self.deleting_since = time.monotonic()
            return _Batch(0, [], self.missing > 0)
        return _Batch(0, [], True)

    def progress(self, progress: Progress) -> None:
        if self.deleting:
            progress.unit = "orphaned session ids"
            progress.basis = "found by the first pass"
            progress.done_units = self.done
            progress.total_units = self.missing or None
            progress.units_started = self.deleting_since
        else:
            progress.unit = "fingerprints"
            progress.basis = "first pass, from the planner's row estimate"
            progress.done_units = self.seen
            progress.total_units = max(self.total or 0, self.seen) or None


def _temp_name(table: sa.Table) -> str:
    return f"{table.schema}.{table.name}"


def _no_session(sessions: sa.Table, key: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
    """No session has the id ``key`` (``NOT EXISTS``, a probe of the primary key)."""
    return ~sa.select(sessions.c.id).where(sessions.c.id == key).exists()


def remove_orphan_fingerprints(
    engine: sa.Engine,
    cutoff: datetime,
    options: StepOptions = StepOptions(),
    *,
    grace: timedelta = GRACE,
    schema: str = "public",
    before_batch: BeforeBatch | None = None,
) -> StepResult:
    """Delete fingerprints whose session does not exist, older than ``cutoff - grace``.

    ``NOT EXISTS``, never ``NOT IN``: ``NOT IN`` is empty as soon as one id is NULL, and it
    becomes a rescanning subplan once the session ids outgrow ``work_mem``.
    """
    walk = _orphan_walk(engine, cutoff, options, grace, schema)
    return _walk(engine, "remove_orphan_fingerprints", walk, cutoff, options, before_batch)


def _orphan_walk(
    engine: sa.Engine, cutoff: datetime, options: StepOptions, grace: timedelta, schema: str
) -> _OrphanWalk:
    tables = t.reflect(schema)
    f, s = tables.fingerprints, tables.sessions
    orphan = [
        f.c.session_id.is_not(None),
        f.c.created_at < cutoff - grace,
        _no_session(s, f.c.session_id),
    ]
    return _OrphanWalk(engine, f, s, orphan, options)
