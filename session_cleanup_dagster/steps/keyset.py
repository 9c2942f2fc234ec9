"""expire_sessions and purge_declines: a keyset walk over an index on a timestamp, or the heap.

expire_sessions has the app's partial index on open sessions' ``expires_at``;
purge_declines has an index on ``created_at`` only if the app made one (the reference schema
has none), and walks the heap otherwise. Each run chooses the walk that reads fewer pages.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
import sqlalchemy.exc

from session_cleanup_dagster import tables as t
from session_cleanup_dagster.contract import RETENTION
from session_cleanup_dagster.steps.heap import (
    _ctid,
    _ctid_in,
    _HeapWalk,
)
from session_cleanup_dagster.steps.loop import (
    FIRST_BATCH,
    BeforeBatch,
    CapCheck,
    Progress,
    SafetyCapExceeded,
    StepOptions,
    StepResult,
    _Batch,
    _begin_batch,
    _count_and_sample,
    _is_lock_conflict,
    _Pace,
    _sample_array,
    _target_s,
    _timed,
    _walk,
)

# Sorts after every uuid: a key (at, _LAST_UUID) passes all rows whose timestamp is ``at``.
_LAST_UUID = uuid.UUID(int=2**128 - 1)

# A step walks the heap instead of its index when the due rows number at least one per this
# many pages of the table. Below that, the index walk reads about one page per due row, fewer
# than one pass over the heap: on a steady night at S, expire_sessions (5,506 due rows,
# 18,661 pages) touched 49.5k pages by the index, 68.0k by the heap; the limit 44.2k.
HEAP_WALK_PAGES_PER_ROW = 1


class _KeysetWalk:
    """Keyset on (timestamp, id) over an index that leads with the timestamp.

    The common batch is plain: it reads the timestamp of the batch's last row from the
    index, then ``UPDATE`` (or ``DELETE``) ``... WHERE <due> AND <timestamp> <= that`` under
    a short ``lock_timeout``, planned like the one-statement limit (the index, then each page
    read once and changed). The statement re-checks the condition on each row's newest
    version, so a row the app changed meanwhile is changed only if still due.

    If the plain statement meets a row lock the app holds longer than that, or would pass
    the safety cap, it is rolled back whole and the same rows are taken the careful way: a
    CTE locks them ``SKIP LOCKED`` (``FOR NO KEY UPDATE`` to update, so the app's foreign-key
    checks are never blocked) and the statement changes them by ``ctid`` (a row we hold
    locked cannot move). Locked rows are skipped and left for the next run. Locking first
    reads each row's page twice more: on a steady night at S, expire_sessions' walk that
    always locked touched 63.3k pages where the plain one touches 49.5k. Dry runs count the
    same rows without locking. Only counts and one key come back to the client.
    """

    def __init__(
        self,
        table: sa.Table,
        at: sa.Column[Any],
        due: Sequence[sa.ColumnElement[bool]],
        options: StepOptions,
        *,
        values: dict[str, Any] | None = None,
        basis: str,
    ) -> None:
        self.s = table
        self.at = at
        self.due = list(due)
        # UPDATE the due rows with these values, or (None) DELETE them.
        self.values = values
        self.basis = basis
        self.key: tuple[datetime, Any] | None = None
        self.total: int | None = None
        self.seen = 0
        self.pace = _Pace(FIRST_BATCH, options.batch_size, _target_s(options))
        # The next batch is taken the careful way (after a lock conflict or near the cap).
        self.careful = False

    def _write(self, where: Sequence[sa.ColumnElement[bool]]) -> sa.Update | sa.Delete:
        if self.values is None:
            return sa.delete(self.s).where(*where)
        return sa.update(self.s).where(*where).values(self.values)

    def start(self, conn: sa.Connection, most: int | None = None) -> None:
        """Count the due rows (through the same index the step walks); at most ``most``."""
        due = sa.select(sa.literal(1)).select_from(self.s).where(*self.due)
        if most is not None:
            due = due.limit(most)
        self.total = conn.execute(
            sa.select(sa.func.count()).select_from(due.subquery())
        ).scalar_one()

    def _next(self, limit: int, lock: bool) -> sa.CTE:
        s, at = self.s, self.at
        query = sa.select(s.c.id, at.label("at"), _ctid()).where(*self.due, *self._after_key())
        query = query.order_by(at, s.c.id).limit(limit)
        if lock:
            # To update: NO KEY UPDATE, as no key column changes, so the app's foreign-key
            # checks (KEY SHARE, from inserting declines) neither block us nor get blocked.
            query = query.with_for_update(skip_locked=True, key_share=self.values is not None)
        return query.cte("picked")

    def _after_key(self) -> list[sa.ColumnElement[bool]]:
        if self.key is None:
            return []
        last_at, last_id = self.key
        if last_id == _LAST_UUID:
            # After a plain batch: no id in the condition, so the index alone answers.
            return [self.at > last_at]
        # Written so the planner can use the index on the timestamp for the range start.
        return [self.at >= last_at, sa.or_(self.at > last_at, self.s.c.id > last_id)]

    def run_batch(
        self, engine: sa.Engine, cap: int, dry_run: bool, want_samples: int, check: CapCheck
    ) -> _Batch:
        if dry_run or self.careful:
            self.careful = False
            return self._locked_batch(engine, cap, dry_run, want_samples, check)
        limit = min(self.pace.size, cap)
        runner, elapsed = _timed(engine)
        try:
            with runner as conn:
                _begin_batch(conn)
                # The batch's last timestamp, read from the index alone.
                end = conn.execute(
                    sa.select(self.at)
                    .where(*self.due, *self._after_key())
                    .order_by(self.at)
                    .offset(limit - 1)
                    .limit(1)
                ).scalar_one_or_none()
                bound = [] if end is None else [self.at <= end]
                done = self._write([*self.due, *self._after_key(), *bound])
                if want_samples > 0:
                    ids = done.returning(self.s.c.id).cte("done")
                    changed, samples = conn.execute(_count_and_sample(ids, want_samples)).one()
                else:
                    # RETURNING reads each changed row's page once more: only for samples.
                    changed, samples = conn.execute(done).rowcount, []
                # Rows sharing the last timestamp all go in: a few past the batch size.
                check(changed)
        except SafetyCapExceeded:
            self.careful = True
            return _Batch(0, [], True)
        except sa.exc.OperationalError as exc:
            if not _is_lock_conflict(exc):
                raise
            self.careful = True
            return _Batch(0, [], True)
        self.pace.observe(int(changed), elapsed())
        self.seen += int(changed)
        if end is not None:
            # Every due row up to ``end`` is done: go on after all of them.
            self.key = (end, _LAST_UUID)
        return _Batch(int(changed), [str(i) for i in samples or []], end is not None)

    def _locked_batch(
        self, engine: sa.Engine, cap: int, dry_run: bool, want_samples: int, check: CapCheck
    ) -> _Batch:
        limit = min(self.pace.size, cap)
        picked = self._next(limit, lock=not dry_run)
        last = sa.select(picked.c.at, picked.c.id).order_by(picked.c.at.desc(), picked.c.id.desc())
        columns: list[Any] = [
            sa.select(sa.func.count()).select_from(picked).scalar_subquery().label("seen"),
            last.with_only_columns(picked.c.at).limit(1).scalar_subquery().label("e"),
            last.with_only_columns(picked.c.id).limit(1).scalar_subquery().label("i"),
        ]
        if dry_run:
            source: Any = picked
        else:
            written = self._write([_ctid_in(sa.select(picked.c.ctid)), *self.due])
            source = written.returning(self.s.c.id).cte("done")
        columns.append(sa.select(sa.func.count()).select_from(source).scalar_subquery())
        columns.append(_sample_array(source, want_samples))
        runner, elapsed = _timed(engine)
        with runner as conn:
            row = conn.execute(sa.select(*columns)).one()
            changed = int(row[3])
            if not dry_run:
                check(changed)
        self.pace.observe(int(row.seen), elapsed())
        if row.seen:
            self.seen += int(row.seen)
            self.key = (row.e, row.i)
        return _Batch(changed, [str(i) for i in row[4] or []], row.seen >= limit)

    def progress(self, progress: Progress) -> None:
        progress.unit = "rows"
        progress.basis = self.basis
        progress.done_units = self.seen
        progress.total_units = self.total

    def finish(self) -> None:
        pass


class _IndexOrHeap:
    """Chooses, per run, the index walk or one pass over the heap, as the planner would.

    Many due rows (a backlog) touch most pages of the table: one pass in physical order reads
    each page once, where the index walk visits the same pages again and again in the
    timestamp's order. A few due rows (a normal night) touch few pages: the index finds them
    without reading the rest of the table. ``optional``: the app may have no such index (a
    whole-table B-tree one that leads with the timestamp); then the heap.
    """

    def __init__(self, index: _KeysetWalk, heap: _HeapWalk, *, optional: bool = False) -> None:
        self.index = index
        self.heap = heap
        self.optional = optional
        self.chosen: _KeysetWalk | _HeapWalk = heap

    def start(self, conn: sa.Connection) -> None:
        self.heap.start(conn)
        if self.optional:
            table = t.qualified_name(conn, self.index.s)
            if ("btree", "") not in t.indexes_leading_with(conn, table, self.index.at.name):
                return
        # The count stops where the heap wins: a backlog's due rows are not all counted
        # (750,000 at L: 60 ms and 10.4k pages, against 14 ms and 1.2k pages up to 93,000).
        most = -(-self.heap.end_page // HEAP_WALK_PAGES_PER_ROW)
        self.index.start(conn, most=most)
        if (self.index.total or 0) < most:
            self.chosen = self.index

    def run_batch(
        self, engine: sa.Engine, cap: int, dry_run: bool, want_samples: int, check: CapCheck
    ) -> _Batch:
        return self.chosen.run_batch(engine, cap, dry_run, want_samples, check)

    def progress(self, progress: Progress) -> None:
        self.chosen.progress(progress)

    def finish(self) -> None:
        pass


def expire_sessions(
    engine: sa.Engine,
    cutoff: datetime,
    options: StepOptions = StepOptions(),
    *,
    schema: str = "public",
    before_batch: BeforeBatch | None = None,
) -> StepResult:
    """Set ``ended_at = expires_at`` on every open session with ``expires_at < cutoff``."""
    s = t.reflect(schema).sessions
    due = [s.c.ended_at.is_(None), s.c.expires_at < cutoff]
    values = {"ended_at": s.c.expires_at}
    basis = "counted from the partial index on open sessions"
    index = _KeysetWalk(s, s.c.expires_at, due, options, values=values, basis=basis)
    walk = _IndexOrHeap(index, _HeapWalk(s, due, options, values=values))
    return _walk(engine, "expire_sessions", walk, cutoff, options, before_batch)


def purge_declines(
    engine: sa.Engine,
    cutoff: datetime,
    options: StepOptions = StepOptions(),
    *,
    retention: timedelta = RETENTION,
    schema: str = "public",
    before_batch: BeforeBatch | None = None,
) -> StepResult:
    """Delete every decline with ``created_at < cutoff - retention``.

    Through the app's B-tree index on ``created_at`` if it has one (and few rows are due),
    else one pass over the heap.
    """
    d = t.reflect(schema).declines
    due = [d.c.created_at < cutoff - retention]
    basis = "counted from the index on created_at"
    index = _KeysetWalk(d, d.c.created_at, due, options, basis=basis)
    walk = _IndexOrHeap(index, _HeapWalk(d, due, options), optional=True)
    return _walk(engine, "purge_declines", walk, cutoff, options, before_batch)
