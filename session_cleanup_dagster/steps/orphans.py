"""remove_orphan_fingerprints: find the orphans' session ids, then delete by key."""

from __future__ import annotations

import time
import typing
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, ClassVar

import sqlalchemy as sa
import sqlalchemy.exc

from session_cleanup_dagster import tables as t
from session_cleanup_dagster.contract import GRACE
from session_cleanup_dagster.steps.chooser import _Chooser
from session_cleanup_dagster.steps.heap import _HeapWalk
from session_cleanup_dagster.steps.loop import (
    FIRST_BATCH,
    BeforeBatch,
    CapCheck,
    Progress,
    StepOptions,
    StepResult,
    _Batch,
    _begin_batch,
    _is_lock_conflict,
    _Lent,
    _Pace,
    _sample_array,
    _target_s,
    _transaction,
    _walk,
)

# Keys in each trial batch of the orphan step's dearer plan of pass 1 (rated by pages/key).
FIND_TRIAL = 100
# Pages one delete by key costs per found session id in the orphan step's second pass: a
# descent of the index on session_id (3 levels at S and L) and a heap fetch.
DESCENT_PAGES = 4
# The most found ids the orphan step's second pass hashes per heap window (a few MB).
HEAP_PASS_MOST_IDS = 50_000
# ... and the fewest pages the fingerprints must fill for it to walk their heap (8 MiB):
# below that either way costs little.
HEAP_PASS_MIN_PAGES = 1024


class _OrphanWalk:
    """Two passes over the index on ``session_id``: find the missing sessions, then delete.

    A batch cannot do the one statement's hash anti-join (it would read every session once
    per batch). Taken in ``session_id`` order, the probes of the sessions' primary key walk it
    from left to right, index-only on both sides, while the fingerprints' visibility map is
    intact; a walk that deletes as it goes clears it. So the walk makes two passes, both in
    key order, on one connection of its own:

    1. **Find** (read-only). Each batch reads the next ``limit`` keys of the index after the
       last batch's, probes the primary key for them, and appends the session ids no session
       has to a temporary table (server-side, on this connection; the client holds no ids).
    2. **Delete.** Each batch takes the next ``limit`` of those ids in key order and deletes
       every due fingerprint of theirs in one statement, re-checking the whole condition on
       each row (a session inserted since pass 1 saves its fingerprints). Deleting by session
       id takes every fingerprint of a session in the same batch. The statement runs under a
       short ``lock_timeout``; if the app holds one of its rows locked, it is redone locking
       rows ``FOR UPDATE SKIP LOCKED`` (locked rows are left for the next run).

       Where pass 1 found few ids (a steady night), pass 2 instead walks the fingerprints'
       heap once by ``ctid`` windows (``_HeapWalk``), each window's rows filtered by a hash
       of the found ids and then by the whole condition: a descent of the index per found
       id (some ``DESCENT_PAGES`` pages, whether or not its fingerprints are due) costs more
       than one read of the heap once the ids outnumber a quarter of its pages.

    Every batch is its own transaction and changes nothing but whole batches; the temporary
    table dies with the connection, so a cancel or crash at any instant costs the next run
    nothing but pass 1 again. Plans are pinned (``SET LOCAL``) to index ranges: a seq scan
    or hash join, which the planner may prefer for a large range, reads a whole table per
    batch.

    Pass 1 has two ways to join its range with the primary key, and each is cheaper in its
    turn, so the walk measures both and runs the one that touches fewer pages per key
    (``_Chooser``, rated by ``pg_stat_get_xact_blocks_fetched`` of both tables and their
    indexes within the batch's transaction; the dearer plan gets trial batches of
    ``FIND_TRIAL`` keys):

    - **probe**: a nested loop, one descent of the primary key per key of the range;
    - **merge**: one scan of the primary key from the range's first key to its last, reading
      every session in between: cheaper while their pages are all-visible, dearer when not.

    Pass 2 probes the primary key per row: its ids are sparse in the key space. The figures
    behind each choice are in docs/design.md.

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
        fenced: Sequence[sa.ColumnElement[bool]] = (),
    ) -> None:
        self.engine = engine
        self.table = table
        self.sessions = sessions
        self.key = table.c.session_id
        self.condition = list(condition)
        # The same condition with the sessions' probe kept a per-row subplan (for pass 2's
        # walk of the heap, which must never become an anti-join reading every session).
        self.fenced = list(fenced) or self.condition
        self.options = options
        # Pass 2 through the heap, when that touches fewer pages than deleting by key.
        self.heap: _HeapWalk | None = None
        self.found = sa.Table(
            "session_cleanup_orphan_ids",
            sa.MetaData(),
            # No index while pass 1 fills it (an index entry per found id cost 3 pages more
            # per row: 15,800 pages for 5,400 ids at S). Its primary key is built in one go
            # after pass 1 when pass 2 goes by key (``_choose_pass_two``).
            sa.Column("id", self.key.type, nullable=False),
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
            ("merge", "probe"),
            FIRST_BATCH,
            options.batch_size,
            _target_s(options),
            trial=FIND_TRIAL,
        )
        # Both tables and their indexes: what pass 1's batches are rated by (pages touched).
        self.relations: list[int] = []
        self.pace = _Pace(FIRST_BATCH, options.batch_size, _target_s(options))

    def start(self, conn: sa.Connection) -> None:
        tuples, _ = t.planner_estimate(conn, self.table)
        self.total = int(tuples) if tuples > 0 else None
        self.relations = t.relation_oids(conn, self.table, self.sessions)

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
        if self.heap is not None:
            lent = typing.cast(sa.Engine, _Lent(own))
            return self.heap.run_batch(lent, cap, dry_run, want_samples, check)
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
            before = t.pages_touched(conn, self.relations)
            seen, last, added = conn.execute(self._find(limit, plan)).one()
            pages = t.pages_touched(conn, self.relations) - before
        self.find.observe(plan, int(seen), time.monotonic() - started, pages=pages)
        self.seen += int(seen)
        self.missing += int(added)
        if last is not None:
            self.low = last
        if seen < limit:
            # Pass 1 is done: pass 2 deletes, if there is anything to delete.
            self.deleting = True
            self.deleting_since = time.monotonic()
            if self.missing > 0:
                self._choose_pass_two(own)
            return _Batch(0, [], self.missing > 0)
        return _Batch(0, [], True)

    def _choose_pass_two(self, own: sa.Connection) -> None:
        """Delete by key (a descent of the index per found id), or walk the heap once.

        Deleting by key costs some ``DESCENT_PAGES`` pages per found id whatever its
        fingerprints' age (most ids a steady night finds have only fingerprints inside the
        grace period, which stay); one pass over the heap costs its pages once, each window
        semi-joined with the found ids by a hash. The heap walk is taken where it touches
        fewer pages and the found ids are few enough to hash per window (HEAP_PASS_MOST_IDS).
        """
        with _transaction(own) as conn:
            pages = t.relation_pages(conn, self.table)
        if (
            pages < HEAP_PASS_MIN_PAGES
            or self.missing * DESCENT_PAGES < pages
            or self.missing > HEAP_PASS_MOST_IDS
        ):
            with _transaction(own) as conn:
                # Pass 2 takes the ids in key order. Each batch of pass 1 added distinct ids
                # past the last batch's, so they are unique.
                conn.execute(sa.text(f"ALTER TABLE {_temp_name(self.found)} ADD PRIMARY KEY (id)"))
            return
        with _transaction(own) as conn:
            # Its size, for the planner's choice of a hashed subplan.
            conn.execute(sa.text(f"ANALYZE {_temp_name(self.found)}"))
        found = sa.select(self.found.c.id).scalar_subquery()
        # Not a top-level IN, so it is never pulled up into a join: a hashed subplan,
        # evaluated before the probe of the sessions (PostgreSQL orders quals by cost).
        among = sa.func.coalesce(self.key.in_(found), sa.false())
        self.heap = _HeapWalk(self.table, [among, *self.fenced], self.options)
        with _transaction(own) as conn:
            self.heap.start(conn)

    def progress(self, progress: Progress) -> None:
        if self.heap is not None:
            self.heap.progress(progress)
            progress.basis = "second pass, through the heap, from its size at the start"
            progress.units_started = self.deleting_since
        elif self.deleting:
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
    due = [f.c.session_id.is_not(None), f.c.created_at < cutoff - grace]
    orphan = [*due, t.no_session(s, f.c.session_id)]
    fenced = [*due, t.no_session(s, f.c.session_id, fenced=True)]
    return _OrphanWalk(engine, f, s, orphan, options, fenced)
