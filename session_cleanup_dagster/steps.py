"""The three cleanup steps as plain functions over a SQLAlchemy engine. No Dagster here.

Each step walks its table once, in batches, and each batch is its own short transaction
that changes only rows matching the step's condition, re-checked by the writing statement
on the row itself. Rows the app holds locked are skipped (``SKIP LOCKED``) and left for the
next run; a batch never waits on the app for more than ``FAST_LOCK_TIMEOUT_MS``.

Batches are sized by time (``StepOptions.target_batch_ms``, at most ``batch_size`` rows):
a fixed small batch pays a round trip per few hundred rows, a fixed large one holds locks
too long. Only one batch of ids (usually none) is ever in the client. The walk never
rescans what it has passed, so the total work is linear in the table size even where no
index serves the condition:

- ``purge_declines`` walks the heap in physical order by windows of ``ctid`` pages (TID
  range scans, PostgreSQL 14+). The app has no index on ``after_hours_declines.created_at``,
  so ``WHERE created_at < x LIMIT n`` re-run per batch would rescan the already-cleaned
  prefix every time: quadratic. See ``_HeapWalk``.
- ``remove_orphan_fingerprints`` walks the index on ``session_id`` by key ranges, so its
  joins with the sessions' primary key run in key order: once to find the orphans' session
  ids (probing or merging, whichever measures faster), once more to delete their
  fingerprints. See ``_OrphanWalk``.
- ``expire_sessions`` walks the partial index on open sessions, keyset on (expires_at, id),
  when few sessions are due, and the heap like the others when many are (``_ExpireChoice``).

The numbers behind these choices are in docs/design.md and benchmarks/README.md.

A dry run walks the same way without locking or changing a row of the app's (the orphan
step still fills its own temporary table), so its counts equal a real run's on the same data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar, Protocol

import psycopg.errors
import sqlalchemy as sa
import sqlalchemy.exc
from sqlalchemy.dialects import postgresql as pg

from session_cleanup_dagster import tables as t
from session_cleanup_dagster.contract import GRACE, RETENTION

# A window never covers more heap than this (64 MiB of 8 KiB pages), so a batch that finds
# few matching rows still reads a bounded amount of data in its transaction.
MAX_WINDOW_PAGES = 8192
SAMPLE_SIZE = 5
# Every walk starts with batches of about this many rows and grows them by time from there.
FIRST_BATCH = 1000
# How long a plain window DELETE may wait for a row lock the app holds before that window is
# redone with FOR UPDATE SKIP LOCKED (the app's own writes last a few milliseconds).
FAST_LOCK_TIMEOUT_MS = 50
# Every batch commits asynchronously. A synchronous commit makes each batch wait for its
# WAL flush, and the app's commits queue behind those flushes: sampled during a cleanup at
# S, the app's writes were waiting on WALSync in 60 % of their time (35 % at idle).
# Measured with ``python -m benchmarks.pacing --commits async,sync`` at S, 5 paired rounds:
# the app's p99 during the cleanup was lower in 4 (median 5.3 against 7.5 ms;
# benchmarks/README.md), and the steps no slower. The cost: a server crash may lose the last
# batches' commits (those of about the last three wal_writer_delay, 600 ms by default),
# each whole, so the data stays consistent and the next run changes those rows again. The
# app's own commits are unaffected.
ASYNC_COMMIT = sa.text("SET LOCAL synchronous_commit = off")
# expire_sessions walks the heap instead of the partial index when the due rows number at
# least one per this many pages of the table (then most pages hold a due row anyway).
HEAP_WALK_PAGES_PER_ROW = 4
# A plain (unbounded) window statement aims at this share of a batch's rows, so a window
# denser than the last one rarely overflows (and is rolled back when it does).
PLAIN_SHARE = 0.6


class TID(sa.types.UserDefinedType[str]):
    """PostgreSQL's ``tid`` (a row's physical address, ``(page,item)``)."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "tid"


@dataclass(frozen=True)
class StepOptions:
    """How a step works; the cutoff itself is an argument of each step."""

    # The most rows one batch (one transaction) may change. Below that, batches are sized
    # so each takes about target_batch_ms; None or 0 means fixed batches of batch_size.
    batch_size: int = 50_000
    dry_run: bool = False
    max_rows: int | None = None
    target_batch_ms: int | None = 100
    # Rows this step may already have changed in earlier attempts of the same run (its
    # retries and the run's re-executions); they count against max_rows (safety_cap.py).
    changed_before: int = 0


@dataclass
class Progress:
    """Where a step is, handed to the ``before_batch`` hook before every batch."""

    step: str
    changed: int = 0
    batches: int = 0
    started: float = field(default_factory=time.monotonic)
    # Of the walk: pages (heap walks) or rows (index walk) done, and the estimated total.
    done_units: int = 0
    total_units: int | None = None
    unit: str = "pages"
    basis: str = "from the table's size in pages at the start"
    # When the walk started counting in ``unit`` (a walk of two passes counts each apart).
    units_started: float | None = None
    # The most rows the next batch may change (it is rolled back whole if it would pass
    # max_rows), set before ``before_batch`` is called.
    next_batch_limit: int = 0

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def units_elapsed(self) -> float:
        """Seconds spent on the units counted so far (the time left is estimated from it)."""
        return time.monotonic() - (self.units_started or self.started)


BeforeBatch = Callable[[Progress], None]


@dataclass(frozen=True)
class StepResult:
    """What a step did (or, in a dry run, would do)."""

    step: str
    changed: int
    batches: int
    dry_run: bool
    cutoff: datetime
    duration_s: float
    sample_ids: tuple[str, ...] = ()

    @property
    def rows_per_second(self) -> float:
        return self.changed / self.duration_s if self.duration_s > 0 else 0.0


class SafetyCapExceeded(Exception):
    """The step stopped before changing more than ``max_rows`` rows."""

    def __init__(
        self, step: str, changed: int, next_batch: int, max_rows: int, *, before: int = 0
    ) -> None:
        self.step = step
        self.changed = changed
        self.next_batch = next_batch
        self.max_rows = max_rows
        earlier = f" (up to {before} of them in earlier attempts of this run)" if before else ""
        super().__init__(
            f"{step} stopped at its safety cap: it changed {changed} rows{earlier}, and the "
            f"next batch of {next_batch} would have taken it past max_rows={max_rows}. That "
            "batch was rolled back; every committed batch is complete. If this many rows "
            "really are due (say, after an outage), raise max_rows for one run or run with "
            "dry_run first."
        )


@dataclass
class _Batch:
    """What one batch did: rows changed (or, dry, matched), a few of their ids, more to do."""

    changed: int
    samples: list[str]
    more: bool


CapCheck = Callable[[int], None]


class _Walk(Protocol):
    """One step's way through its table."""

    def start(self, conn: sa.Connection) -> None: ...

    def run_batch(
        self, engine: sa.Engine, cap: int, dry_run: bool, want_samples: int, check: CapCheck
    ) -> _Batch:
        """Run one batch, changing at most ``cap`` rows; ``check(changed)`` runs before commit."""
        ...

    def progress(self, progress: Progress) -> None: ...

    def finish(self) -> None:
        """Release what the batches took, such as a connection (runs however they ended)."""
        ...


class _Pace:
    """Sizes batches so that each takes about ``target_s`` (when set), between 1 and ``most``.

    The next size follows the rate the last batch achieved, but at most doubles or halves at
    a time, so one odd batch (a checkpoint, a busy neighbour) cannot swing it far.
    """

    def __init__(self, first: int, most: int, target_s: float | None) -> None:
        self.most = max(1, most)
        self.size = max(1, min(first, self.most)) if target_s else self.most
        self.target_s = target_s

    def observe(self, units: int, seconds: float) -> None:
        if not self.target_s or units <= 0:
            return
        ideal = units / max(seconds, 1e-4) * self.target_s
        self.size = int(max(1, min(self.most, self.size * 2, max(self.size / 2, ideal))))


class _Chooser:
    """Runs, batch by batch, whichever of two plans has lately done more units per second.

    Batch 0 runs the first plan, batch 1 the second, at the same size. From there the
    faster one runs, and the other gets a batch again after 2 batches, then 4, 8, 16, 16, ...
    while the faster one stays ahead (back to 2 when they swap). So a first measurement
    that was off (a cold cache) is corrected early, a rate that changes later is still
    seen, and the slower plan costs at most one batch in 17 once the choice is settled.
    Each plan keeps its own pace: a batch of the slower plan is sized by its own last rate,
    never larger than the faster plan's batches, so it too stays near the target duration.
    """

    MOST_BETWEEN = 16

    def __init__(self, plans: tuple[str, str], first: int, most: int, target_s: float | None):
        self.plans = plans
        self.paces = {plan: _Pace(first, most, target_s) for plan in plans}
        self.rates: dict[str, float] = {}
        self.runs = dict.fromkeys(plans, 0)  # batches run, by plan
        self.best = plans[0]
        self.between = 2  # batches of the faster plan before the other's next one
        self.since = 0  # batches of the faster plan since the other's last one

    def _other(self) -> str:
        return self.plans[1] if self.best == self.plans[0] else self.plans[0]

    def next(self) -> tuple[str, int]:
        """The plan for the next batch, and its size."""
        batches = sum(self.runs.values())
        if batches < len(self.plans):
            plan = self.plans[batches]
        else:
            plan = self._other() if self.since >= self.between else self.best
        pace = self.paces[plan]
        rate = self.rates.get(plan)
        if plan != self.best and rate is not None and pace.target_s:
            ideal = int(rate * pace.target_s)
            pace.size = max(1, min(self.paces[self.best].size, max(pace.size, ideal)))
        return plan, pace.size

    def observe(self, plan: str, units: int, seconds: float) -> None:
        """What a batch of ``plan`` did; the next batch's plan follows from it."""
        self.runs[plan] += 1
        self.paces[plan].observe(units, seconds)
        if units <= 0:
            return
        # Half the last batch, half the batches before it: one slow batch (a checkpoint, the
        # app's load) halves a rate for one batch only, so it does not swap plans on its own.
        rate = units / max(seconds, 1e-4)
        self.rates[plan] = (self.rates[plan] + rate) / 2 if plan in self.rates else rate
        if len(self.rates) < len(self.plans):
            return
        best = max(self.rates, key=self.rates.__getitem__)
        if best != self.best:
            self.best, self.between, self.since = best, 2, 0
        elif plan == self.best:
            self.since += 1
        else:
            self.between, self.since = min(2 * self.between, self.MOST_BETWEEN), 0


def _timed(
    engine: sa.Engine,
) -> tuple[AbstractContextManager[sa.Connection], Callable[[], float]]:
    """A batch transaction and a clock started now (used to pace the next batch)."""
    started = time.monotonic()
    return batch_transaction(engine), lambda: time.monotonic() - started


@contextmanager
def batch_transaction(engine: sa.Engine) -> Iterator[sa.Connection]:
    """One batch's transaction on a connection of its own; see ``_transaction``."""
    conn = engine.connect()
    try:
        with _transaction(conn):
            yield conn
    finally:
        conn.close()


@contextmanager
def _transaction(conn: sa.Connection) -> Iterator[sa.Connection]:
    """One batch's transaction, which also survives being interrupted mid-statement.

    Dagster stops a run by raising ``DagsterExecutionInterruptedError`` (a BaseException,
    not KeyboardInterrupt) inside the op. psycopg only cancels the server-side query on
    KeyboardInterrupt, so for any non-Exception interrupt we cancel the query on the server
    ourselves and drop the connection: the server rolls the open transaction back, so the
    batch is wholly not applied, and the interrupt goes on up.

    The batch commits without waiting for its WAL to reach disk (``synchronous_commit``
    off, for this transaction only); see ``ASYNC_COMMIT``.
    """
    trans = conn.begin()
    try:
        conn.execute(ASYNC_COMMIT)
        yield conn
    except Exception:
        trans.rollback()
        raise
    except BaseException:
        _cancel_and_discard(conn)
        raise
    else:
        trans.commit()


def _cancel_and_discard(conn: sa.Connection) -> None:
    try:
        raw = conn.connection.dbapi_connection
        if raw is not None:
            raw.cancel_safe(timeout=3.0)  # type: ignore[attr-defined]
    except Exception:  # noqa: S110 - best effort: the close below ends the transaction anyway
        pass
    conn.invalidate()


def _walk(
    engine: sa.Engine,
    name: str,
    walk: _Walk,
    cutoff: datetime,
    options: StepOptions,
    before_batch: BeforeBatch | None,
) -> StepResult:
    progress = Progress(step=name)
    samples: list[str] = []
    with engine.connect() as conn:
        walk.start(conn)
        conn.rollback()

    def check(changed: int) -> None:
        # Runs inside the batch's transaction, before its commit: a batch that would pass
        # the cap is rolled back whole, so no committed work ever exceeds max_rows.
        done = options.changed_before + progress.changed
        if options.max_rows is not None and done + changed > options.max_rows:
            raise SafetyCapExceeded(
                name, done, changed, options.max_rows, before=options.changed_before
            )

    try:
        while True:
            walk.progress(progress)
            cap = options.batch_size
            if options.max_rows is not None and not options.dry_run:
                # One row more than the cap allows, so "would pass the cap" is visible.
                left = options.max_rows - options.changed_before - progress.changed
                cap = max(1, min(cap, left + 1))
            progress.next_batch_limit = cap
            if before_batch is not None:
                before_batch(progress)
            batch = walk.run_batch(engine, cap, options.dry_run, SAMPLE_SIZE - len(samples), check)
            if batch.changed:
                progress.batches += 1
                progress.changed += batch.changed
                samples.extend(batch.samples[: SAMPLE_SIZE - len(samples)])
            if not batch.more:
                break
    finally:
        walk.finish()
    walk.progress(progress)
    return StepResult(
        step=name,
        changed=progress.changed,
        batches=progress.batches,
        dry_run=options.dry_run,
        cutoff=cutoff,
        duration_s=progress.elapsed,
        sample_ids=tuple(samples),
    )


# --- expire_sessions: keyset walk over the partial index on open sessions --------------------


class _ExpireWalk:
    """Keyset on (expires_at, id) over the partial index; one statement per batch.

    Each batch is one round trip: a CTE locks the next rows ``FOR NO KEY UPDATE SKIP LOCKED``
    and the UPDATE in the same statement changes them by ``ctid`` (a TID scan, no second
    index lookup; a row we hold locked cannot move). The UPDATE re-checks the condition on
    the row itself. One statement is enough here because the condition reads only the row's
    own columns: a row the app changed after our snapshot is either skipped by the lock or
    re-checked on its newest version, and a version our snapshot cannot see is not updated
    (it stays for the next run). Nothing but counts and one key comes back to the client.
    """

    def __init__(self, tables: t.Tables, cutoff: datetime, options: StepOptions) -> None:
        self.s = tables.sessions
        self.cutoff = cutoff
        self.key: tuple[datetime, Any] | None = None
        self.total: int | None = None
        self.seen = 0
        self.pace = _Pace(FIRST_BATCH, options.batch_size, _target_s(options))

    def _due(self) -> list[sa.ColumnElement[bool]]:
        return [self.s.c.ended_at.is_(None), self.s.c.expires_at < self.cutoff]

    def start(self, conn: sa.Connection) -> None:
        # Counting the due rows walks the same small partial index the step will walk.
        self.total = conn.execute(
            sa.select(sa.func.count()).select_from(self.s).where(*self._due())
        ).scalar_one()

    def _next(self, limit: int, lock: bool) -> sa.CTE:
        s = self.s
        query = sa.select(s.c.id, s.c.expires_at, _ctid()).where(*self._due())
        if self.key is not None:
            last_expires, last_id = self.key
            # Written so the planner can use the index on expires_at for the range start.
            query = query.where(
                s.c.expires_at >= last_expires,
                sa.or_(s.c.expires_at > last_expires, s.c.id > last_id),
            )
        query = query.order_by(s.c.expires_at, s.c.id).limit(limit)
        if lock:
            # NO KEY UPDATE: ended_at is not a key column, so the app's foreign-key checks
            # (KEY SHARE, from inserting declines) neither block us nor get blocked by us.
            query = query.with_for_update(skip_locked=True, key_share=True)
        return query.cte("picked")

    def run_batch(
        self, engine: sa.Engine, cap: int, dry_run: bool, want_samples: int, check: CapCheck
    ) -> _Batch:
        s = self.s
        limit = min(self.pace.size, cap)
        picked = self._next(limit, lock=not dry_run)
        last = sa.select(picked.c.expires_at, picked.c.id).order_by(
            picked.c.expires_at.desc(), picked.c.id.desc()
        )
        columns: list[Any] = [
            sa.select(sa.func.count()).select_from(picked).scalar_subquery().label("seen"),
            last.with_only_columns(picked.c.expires_at).limit(1).scalar_subquery().label("e"),
            last.with_only_columns(picked.c.id).limit(1).scalar_subquery().label("i"),
        ]
        if dry_run:
            source: Any = picked
        else:
            source = (
                sa.update(s)
                .where(_ctid_in(sa.select(picked.c.ctid)), *self._due())
                .values(ended_at=s.c.expires_at)
                .returning(s.c.id)
                .cte("done")
            )
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
        progress.basis = "counted from the partial index on open sessions"
        progress.done_units = self.seen
        progress.total_units = self.total

    def finish(self) -> None:
        pass


_UUIDS = pg.ARRAY(pg.UUID)


class _ExpireChoice:
    """Chooses, per run, the index walk or one pass over the heap, as the planner would.

    Many due rows (a backlog) touch most pages of the table: one pass in physical order reads
    each page once, where the index walk visits the same pages again and again in
    ``expires_at`` order. A few due rows (a normal night) touch few pages: the partial index
    finds them without reading the rest of the table.
    """

    def __init__(self, index: _ExpireWalk, heap: _HeapWalk) -> None:
        self.index = index
        self.heap = heap
        self.chosen: _ExpireWalk | _HeapWalk = index

    def start(self, conn: sa.Connection) -> None:
        self.index.start(conn)
        self.heap.start(conn)
        due = self.index.total or 0
        if due * HEAP_WALK_PAGES_PER_ROW >= self.heap.end_page:
            self.chosen = self.heap

    def run_batch(
        self, engine: sa.Engine, cap: int, dry_run: bool, want_samples: int, check: CapCheck
    ) -> _Batch:
        return self.chosen.run_batch(engine, cap, dry_run, want_samples, check)

    def progress(self, progress: Progress) -> None:
        self.chosen.progress(progress)

    def finish(self) -> None:
        pass


def _begin_batch(conn: sa.Connection, off: Sequence[str] = ()) -> None:
    """A writing batch's settings, for its transaction only, in one round trip.

    ``lock_timeout`` is ``FAST_LOCK_TIMEOUT_MS``, and each planner setting in ``off`` is off.
    """
    settings = [(name, "off") for name in off]
    settings.append(("lock_timeout", f"{FAST_LOCK_TIMEOUT_MS}ms"))
    conn.execute(sa.select(*(sa.func.set_config(n, v, sa.true()) for n, v in settings)))


def _target_s(options: StepOptions) -> float | None:
    return options.target_batch_ms / 1000 if options.target_batch_ms else None


def _ctid() -> sa.ColumnElement[str]:
    return sa.literal_column("ctid", TID()).label("ctid")


def _ctid_in(tids: sa.Select[Any]) -> sa.ColumnElement[bool]:
    """``ctid = ANY(ARRAY(subquery))``: planned as a TID scan, one heap fetch per row."""
    return sa.literal_column("ctid", TID()) == sa.any_(
        sa.func.array(tids.scalar_subquery(), type_=pg.ARRAY(TID()))
    )


def _count_and_sample(source: Any, want: int) -> sa.Select[Any]:
    """How many rows ``source`` has, and up to ``want`` of their ids."""
    counted = sa.select(sa.func.count()).select_from(source).scalar_subquery()
    return sa.select(counted, _sample_array(source, want))


def _sample_array(source: Any, want: int) -> sa.ScalarSelect[Any]:
    """Up to ``want`` ids of ``source`` as one array (never the whole batch)."""
    ids = sa.select(source.c.id).limit(max(0, want)).subquery()
    return sa.select(sa.func.array_agg(ids.c.id)).scalar_subquery()


# --- purge_declines (and expire_sessions' backlogs): one pass over the heap by ctid ---------


class _Overflow(Exception):
    """A plain window statement changed more rows than a batch may: it is rolled back."""


class _FastPathBlocked(Exception):
    """The one-statement path cannot take this window (the safety cap is near)."""


class _HeapWalk:
    """Walks a table once in physical order, through windows of whole pages.

    The common case is one plain statement per window,
    ``DELETE ... WHERE ctid >= (lo,0) AND ctid < (hi,0) AND <condition>``: a TID range scan
    that reads each page once and deletes in place, the same work per row as the one-statement
    limit. Locking every row first (``FOR UPDATE``) and deleting it in a second pass writes
    each tuple header and WAL twice, which measured at under half the limit's rows/s.

    Rows the app holds locked are still never waited on for long, nor changed wrongly: the
    plain DELETE runs under a short ``lock_timeout``. If it meets a row lock the app holds
    longer than that, or the window holds more rows than a batch may change, the batch is
    rolled back whole and that window is walked the careful way instead: rows locked in ctid
    order with ``FOR UPDATE SKIP LOCKED`` (locked rows are skipped and left for the next run),
    then deleted by id with the condition re-checked in that statement's fresh snapshot.

    The window is sized by time (``target_batch_ms``) and by the rows a batch may change.
    """

    def __init__(
        self,
        table: sa.Table,
        condition: Sequence[sa.ColumnElement[bool]],
        options: StepOptions,
        values: dict[str, Any] | None = None,
    ) -> None:
        self.table = table
        # DELETE the matching rows, or (values given) UPDATE them; an UPDATE of non-key
        # columns locks FOR NO KEY UPDATE, which the app's foreign-key checks do not conflict
        # with.
        self.values = values
        self.condition = list(condition)
        self.ctid = _ctid()
        # The walk has passed everything up to here (exclusive): (page, item), and item 0
        # means "from the start of the page" (item numbers start at 1).
        self.position: tuple[int, int] = (0, 0)
        self.end_page = 0
        self.rechecked_end = False
        self.density = 50.0  # rows per page until pg_class says otherwise
        self.matched_per_page = 0.0  # of the condition, as last seen
        self.target_s = _target_s(options)
        self.window = _Pace(1, MAX_WINDOW_PAGES, self.target_s)
        self.rows = _Pace(FIRST_BATCH, options.batch_size, self.target_s)
        self.settled = False
        # The careful path inside one window: position within it, and its own batch size.
        self.careful_until: int | None = None
        self.careful = _Pace(FIRST_BATCH, options.batch_size, self.target_s)

    def start(self, conn: sa.Connection) -> None:
        self.end_page = t.relation_pages(conn, self.table)
        tuples, pages = t.planner_estimate(conn, self.table)
        if pages and tuples > 0:
            self.density = max(1.0, tuples / pages)
        # The first window holds about one first batch of rows, whatever matches.
        first = FIRST_BATCH if self.target_s else self.rows.most
        self.window.size = max(1, min(MAX_WINDOW_PAGES, math.ceil(first / self.density)))

    def _bounds(self, lo: tuple[int, int], hi_page: int) -> list[sa.ColumnElement[bool]]:
        tid_lo = sa.cast(sa.bindparam("lo", f"({lo[0]},{lo[1]})", type_=sa.String), TID())
        tid_hi = sa.cast(sa.bindparam("hi", f"({hi_page},0)", type_=sa.String), TID())
        # Inclusive at a page start (item 0 does not exist), exclusive after a seen row.
        first = self.ctid >= tid_lo if lo[1] == 0 else self.ctid > tid_lo
        return [first, self.ctid < tid_hi]

    def _window_pages(self, rows: int, share: float) -> int:
        pages = self.window.size
        if self.matched_per_page > 0:
            # Aim the window at fewer matching rows than the batch may take.
            pages = min(pages, max(1, int(share * rows / self.matched_per_page)))
        return pages

    def run_batch(
        self, engine: sa.Engine, cap: int, dry_run: bool, want_samples: int, check: CapCheck
    ) -> _Batch:
        if self.careful_until is not None:
            return self._careful_batch(engine, cap, want_samples, check)
        limit = min(cap, self.rows.size)
        # Where the last window showed how densely rows match, the window is sized to hold
        # well under a batch and changed by the plainest statement. Elsewhere (the start,
        # sparse stretches, right after an overflow) a LIMIT bounds the batch.
        plain = not dry_run and want_samples <= 0 and self.matched_per_page > 0 and self.settled
        self.settled = False
        pages = self._window_pages(limit, PLAIN_SHARE if plain else 0.8)
        hi = self.position[0] + pages
        where = [*self._bounds(self.position, hi), *self.condition]
        runner, elapsed = _timed(engine)
        try:
            with runner as conn:
                if dry_run:
                    # Counting changes nothing, so a dry batch takes the whole window.
                    source: Any = sa.select(self.table.c.id).where(*where).cte("matched")
                    changed, samples = conn.execute(_count_and_sample(source, want_samples)).one()
                    seen, last = 0, None
                elif plain:
                    _begin_batch(conn)
                    changed = conn.execute(self._write(where)).rowcount
                    seen, samples, last = changed, [], None
                    if changed > limit:
                        # Denser than the last window: undo, and bound the next batch.
                        self.matched_per_page = changed / pages
                        raise _Overflow
                else:
                    seen, changed, samples, last = self._change_window(
                        conn, where, limit, want_samples
                    )
                if not dry_run:
                    try:
                        check(changed)
                    except SafetyCapExceeded:
                        # A part of this window may still fit under the cap: the careful
                        # path finds out row by row, and raises if not.
                        raise _FastPathBlocked from None
        except _Overflow:
            return _Batch(0, [], True)
        except _FastPathBlocked:
            return self._fall_back(pages)
        except sa.exc.OperationalError as exc:
            if not _is_lock_conflict(exc):
                raise
            return self._fall_back(pages)
        seconds = elapsed()
        self.rows.observe(seen, seconds)
        full = seen >= limit and last is not None
        if full:
            # The window holds more: go on right after the last row taken (rows came in
            # ctid order). A row the app moved meanwhile reports its new ctid; stay inside.
            assert last is not None
            at = _parse_tid(last)
            # The rows came from the pages up to the last one taken, not the whole window.
            covered = max(1, at[0] - self.position[0] + 1)
            self.matched_per_page = max(self.matched_per_page, seen / covered)
            self.position = at if self.position < at and at[0] < hi else (hi, 0)
            self.window.size = max(1, pages // 2)
        else:
            self.window.observe(pages, seconds)
            self.matched_per_page = seen / pages
            self.position = (hi, 0)
            # A whole window taken: its density is a fair guide to the next window's.
            self.settled = seen > 0
        more = full or self._more(engine)
        return _Batch(int(changed), [str(i) for i in samples or []], more)

    def _write(self, where: Sequence[sa.ColumnElement[bool]]) -> sa.Delete | sa.Update:
        if self.values is None:
            return sa.delete(self.table).where(*where)
        return sa.update(self.table).where(*where).values(self.values)

    def _change_window(
        self,
        conn: sa.Connection,
        where: list[sa.ColumnElement[bool]],
        limit: int,
        want_samples: int,
    ) -> tuple[int, int, list[Any], str | None]:
        """Change the window's first ``limit`` matching rows in ctid order.

        Returns how many matched, how many changed, sample ids, and the last ctid taken.
        """
        _begin_batch(conn)
        picked = sa.select(self.ctid).where(*where).order_by(self.ctid).limit(limit).cte("picked")
        changed = (
            self._write([_ctid_in(sa.select(picked.c.ctid)), *self.condition])
            .returning(self.table.c.id)
            .cte("changed")
        )
        row = conn.execute(
            sa.select(
                sa.select(sa.func.count()).select_from(picked).scalar_subquery(),
                sa.select(sa.func.count()).select_from(changed).scalar_subquery(),
                _sample_array(changed, want_samples),
                sa.select(sa.func.max(picked.c.ctid)).scalar_subquery(),
            )
        ).one()
        return int(row[0]), int(row[1]), list(row[2] or []), row[3]

    def _fall_back(self, pages: int) -> _Batch:
        """Walk this window the careful way (or a smaller window, if it was just too full)."""
        self.careful_until = self.position[0] + pages
        return _Batch(0, [], True)

    def _careful_batch(
        self, engine: sa.Engine, cap: int, want_samples: int, check: CapCheck
    ) -> _Batch:
        assert self.careful_until is not None
        limit = min(self.careful.size, cap)
        query = (
            sa.select(self.table.c.id, self.ctid)
            .where(*self._bounds(self.position, self.careful_until), *self.condition)
            .order_by(self.ctid)
            .limit(limit)
            .with_for_update(skip_locked=True, of=self.table, key_share=self.values is not None)
        )
        runner, elapsed = _timed(engine)
        with runner as conn:
            rows = conn.execute(query).all()
            ids = [row.id for row in rows]
            changed = 0
            if ids:
                by_id = self.table.c.id == sa.any_(sa.bindparam("ids", ids, type_=_UUIDS))
                changed = conn.execute(self._write([by_id, *self.condition])).rowcount
                check(changed)
        self.careful.observe(len(rows), elapsed())
        samples = [str(i) for i in ids[: max(0, want_samples)]]
        if len(rows) >= limit:
            # Full batch: go on after the last row we saw. A row the app moved (updated)
            # while we locked it reports its new ctid; keep inside the window.
            page, item = _parse_tid(rows[-1].ctid)
            if (page, item) > self.position and page < self.careful_until:
                self.position = (page, item)
                return _Batch(changed, samples, True)
        self.position = (self.careful_until, 0)
        self.careful_until = None
        return _Batch(changed, samples, self._more(engine))

    def _more(self, engine: sa.Engine) -> bool:
        if self.position[0] < self.end_page:
            return True
        # Rows the app rewrote during the walk may now sit past the old end: walk on once.
        if self.rechecked_end:
            return False
        self.rechecked_end = True
        with engine.connect() as conn:
            end = t.relation_pages(conn, self.table)
        if end > self.end_page:
            self.end_page = end
            return True
        return False

    def progress(self, progress: Progress) -> None:
        progress.unit = "pages"
        progress.basis = "from the table's size in pages at the start"
        progress.done_units = min(self.position[0], self.end_page)
        progress.total_units = self.end_page

    def finish(self) -> None:
        pass


# --- remove_orphan_fingerprints: find the orphans' session ids, then delete by key ---------


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


def _is_lock_conflict(exc: sa.exc.OperationalError) -> bool:
    return isinstance(exc.orig, psycopg.errors.LockNotAvailable | psycopg.errors.DeadlockDetected)


def _parse_tid(value: str) -> tuple[int, int]:
    page, item = value.strip("()").split(",")
    return int(page), int(item)


# --- the steps ---------------------------------------------------------------------------


def expire_sessions(
    engine: sa.Engine,
    cutoff: datetime,
    options: StepOptions = StepOptions(),
    *,
    schema: str = "public",
    before_batch: BeforeBatch | None = None,
) -> StepResult:
    """Set ``ended_at = expires_at`` on every open session with ``expires_at < cutoff``."""
    tables = t.reflect(schema)
    s = tables.sessions
    due = [s.c.ended_at.is_(None), s.c.expires_at < cutoff]
    heap = _HeapWalk(s, due, options, values={"ended_at": s.c.expires_at})
    walk = _ExpireChoice(_ExpireWalk(tables, cutoff, options), heap)
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
    """Delete every decline with ``created_at < cutoff - retention``."""
    d = t.reflect(schema).declines
    walk = _HeapWalk(d, [d.c.created_at < cutoff - retention], options)
    return _walk(engine, "purge_declines", walk, cutoff, options, before_batch)


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


def database_now(engine: sa.Engine) -> datetime:
    """The database server's ``now()``: the cutoff of a run with no partition or as_of."""
    with engine.connect() as conn:
        value: datetime = conn.execute(sa.select(sa.func.now())).scalar_one()
    return value
