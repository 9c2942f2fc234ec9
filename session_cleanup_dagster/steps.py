"""The three cleanup steps as plain functions over a SQLAlchemy engine. No Dagster here.

Each step walks its table once, in batches, and each batch is its own short transaction:

1. lock the next batch of matching rows with ``FOR UPDATE SKIP LOCKED`` (rows the app holds
   locked are skipped and left for the next run; we never wait on the app);
2. change exactly those rows, re-checking the condition in the writing statement (a fresh
   snapshot under READ COMMITTED, so a session that committed in between is seen);
3. commit.

Only one batch of ids is ever in the client. The walk never rescans what it has passed, so
the total work is linear in the table size even where no index serves the condition:

- ``expire_sessions`` walks the partial index on open sessions, keyset on (expires_at, id);
- ``purge_declines`` and ``remove_orphan_fingerprints`` walk the heap in physical order by
  ranges of ``ctid`` (a TID range scan, PostgreSQL 14+). The app has no index on
  ``after_hours_declines.created_at``, so ``WHERE created_at < x LIMIT n`` re-run per batch
  would rescan the already-cleaned prefix every time: quadratic.

A dry run walks the same batches without locking or writing, so its counts equal a real
run's on the same data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from session_cleanup_dagster import tables as t

# A window never covers more heap than this (64 MiB of 8 KiB pages), so a batch that finds
# few matching rows still reads a bounded amount of data in its transaction.
MAX_WINDOW_PAGES = 8192
SAMPLE_SIZE = 5


class TID(sa.types.UserDefinedType[str]):
    """PostgreSQL's ``tid`` (a row's physical address, ``(page,item)``)."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "tid"


@dataclass(frozen=True)
class StepOptions:
    """How a step works; the cutoff itself is an argument of each step."""

    batch_size: int = 1000
    dry_run: bool = False
    max_rows: int | None = None


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

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


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

    def __init__(self, step: str, changed: int, next_batch: int, max_rows: int) -> None:
        self.step = step
        self.changed = changed
        self.next_batch = next_batch
        self.max_rows = max_rows
        super().__init__(
            f"{step} stopped at its safety cap: it changed {changed} rows, and the next batch "
            f"of {next_batch} would have taken it past max_rows={max_rows}. That batch was "
            "rolled back; every committed batch is complete. If this many rows really are "
            "due (say, after an outage), raise max_rows for one run or run with dry_run first."
        )


class _Walk(Protocol):
    """One step's way through its table."""

    def start(self, conn: sa.Connection) -> None: ...

    def select_batch(self, conn: sa.Connection, limit: int, lock: bool) -> Sequence[sa.Row[Any]]:
        """The next rows that match, at most ``limit``; the first column is the id."""
        ...

    def apply(self, conn: sa.Connection, ids: list[Any]) -> int:
        """Change these rows where they still match; returns how many changed."""
        ...

    def advance(self, rows: Sequence[sa.Row[Any]], limit: int) -> bool:
        """Move past ``rows``; return False when the walk is over."""
        ...

    def progress(self, progress: Progress) -> None: ...


@contextmanager
def batch_transaction(engine: sa.Engine) -> Iterator[sa.Connection]:
    """One batch's transaction, which also survives being interrupted mid-statement.

    Dagster stops a run by raising ``DagsterExecutionInterruptedError`` (a BaseException,
    not KeyboardInterrupt) inside the op. psycopg only cancels the server-side query on
    KeyboardInterrupt, so for any non-Exception interrupt we cancel the query on the server
    ourselves and drop the connection: the server rolls the open transaction back, so the
    batch is wholly not applied, and the interrupt goes on up.
    """
    conn = engine.connect()
    try:
        trans = conn.begin()
        try:
            yield conn
        except Exception:
            trans.rollback()
            raise
        except BaseException:
            _cancel_and_discard(conn)
            raise
        else:
            trans.commit()
    finally:
        conn.close()


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
    while True:
        walk.progress(progress)
        if before_batch is not None:
            before_batch(progress)
        limit = options.batch_size
        if options.max_rows is not None and not options.dry_run:
            # Ask for one row more than the cap allows, so "would pass the cap" is visible.
            limit = min(limit, options.max_rows - progress.changed + 1)
        with batch_transaction(engine) as conn:
            rows = walk.select_batch(conn, limit, lock=not options.dry_run)
            ids = [row[0] for row in rows]
            changed = len(ids) if options.dry_run else (walk.apply(conn, ids) if ids else 0)
            if (
                options.max_rows is not None
                and not options.dry_run
                and progress.changed + changed > options.max_rows
            ):
                raise SafetyCapExceeded(name, progress.changed, changed, options.max_rows)
        if ids:
            progress.batches += 1
            progress.changed += changed
            samples.extend(str(i) for i in ids[: SAMPLE_SIZE - len(samples)])
        if not walk.advance(rows, limit):
            break
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
    def __init__(self, tables: t.Tables, cutoff: datetime) -> None:
        self.s = tables.sessions
        self.cutoff = cutoff
        self.key: tuple[datetime, Any] | None = None
        self.total: int | None = None
        self.seen = 0

    def _due(self) -> list[sa.ColumnElement[bool]]:
        return [self.s.c.ended_at.is_(None), self.s.c.expires_at < self.cutoff]

    def start(self, conn: sa.Connection) -> None:
        # Counting the due rows walks the same small partial index the step will walk.
        self.total = conn.execute(
            sa.select(sa.func.count()).select_from(self.s).where(*self._due())
        ).scalar_one()

    def select_batch(self, conn: sa.Connection, limit: int, lock: bool) -> Sequence[sa.Row[Any]]:
        s = self.s
        query = sa.select(s.c.id, s.c.expires_at).where(*self._due())
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
        return conn.execute(query).all()

    def apply(self, conn: sa.Connection, ids: list[Any]) -> int:
        s = self.s
        result = conn.execute(
            sa.update(s)
            .where(s.c.id == sa.any_(sa.bindparam("ids", ids, type_=pg.ARRAY(pg.UUID))))
            .where(*self._due())
            .values(ended_at=s.c.expires_at)
        )
        return result.rowcount

    def advance(self, rows: Sequence[sa.Row[Any]], limit: int) -> bool:
        if not rows:
            return False
        self.seen += len(rows)
        self.key = (rows[-1].expires_at, rows[-1].id)
        return len(rows) >= limit

    def progress(self, progress: Progress) -> None:
        progress.unit = "rows"
        progress.done_units = self.seen
        progress.total_units = self.total


# --- purge_declines and remove_orphan_fingerprints: one pass over the heap by ctid ----------


class _HeapWalk:
    """Walks a table in physical order through windows of pages.

    The window adapts: a batch that fills up halves it (dense region), a window that yields
    under half a batch doubles it (sparse region), up to MAX_WINDOW_PAGES. Within a window
    rows come in ctid order, so a full batch resumes right after its last row.
    """

    def __init__(self, table: sa.Table, condition: Sequence[sa.ColumnElement[bool]]) -> None:
        self.table = table
        self.condition = list(condition)
        self.ctid = sa.literal_column("ctid", TID()).label("ctid")
        self.position: tuple[int, int] = (0, 0)  # exclusive: item numbers start at 1
        self.window = 0  # pages; sized from the batch size on the first batch
        self.hi_page = 0
        self.end_page = 0
        self.rechecked_end = False
        self.density = 50.0  # rows per page until pg_class says otherwise

    def _pages(self, conn: sa.Connection) -> int:
        name = t.qualified_name(conn, self.table)
        return int(
            conn.execute(
                sa.text(
                    "SELECT pg_relation_size(CAST(:name AS regclass))"
                    " / current_setting('block_size')::int"
                ),
                {"name": name},
            ).scalar_one()
        )

    def start(self, conn: sa.Connection) -> None:
        self.end_page = self._pages(conn)
        name = t.qualified_name(conn, self.table)
        row = conn.execute(
            sa.text("SELECT reltuples, relpages FROM pg_class WHERE oid = CAST(:name AS regclass)"),
            {"name": name},
        ).one()
        if row.relpages and row.reltuples and row.reltuples > 0:
            self.density = max(1.0, float(row.reltuples) / float(row.relpages))

    def select_batch(self, conn: sa.Connection, limit: int, lock: bool) -> Sequence[sa.Row[Any]]:
        if self.window == 0:
            self.window = max(1, min(MAX_WINDOW_PAGES, math.ceil(limit / self.density)))
        self.hi_page = self.position[0] + self.window
        lo = f"({self.position[0]},{self.position[1]})"
        hi = f"({self.hi_page},0)"
        tid_lo = sa.cast(sa.bindparam("lo", lo, type_=sa.String), TID())
        tid_hi = sa.cast(sa.bindparam("hi", hi, type_=sa.String), TID())
        query = (
            sa.select(self.table.c.id, self.ctid)
            .where(self.ctid > tid_lo, self.ctid < tid_hi, *self.condition)
            .order_by(self.ctid)
            .limit(limit)
        )
        if lock:
            query = query.with_for_update(skip_locked=True, of=self.table)
        return conn.execute(query).all()

    def apply(self, conn: sa.Connection, ids: list[Any]) -> int:
        result = conn.execute(
            sa.delete(self.table)
            .where(self.table.c.id == sa.any_(sa.bindparam("ids", ids, type_=pg.ARRAY(pg.UUID))))
            .where(*self.condition)
        )
        return result.rowcount

    def advance(self, rows: Sequence[sa.Row[Any]], limit: int) -> bool:
        if len(rows) >= limit:
            # Full batch: the window goes on after the last row we saw. A row the app moved
            # (updated) while we locked it reports its new ctid; keep inside the window.
            page, item = _parse_tid(rows[-1].ctid)
            if (page, item) <= self.position or page >= self.hi_page:
                self.position = (self.hi_page, 0)
            else:
                self.position = (page, item)
            self.window = max(1, self.window // 2)
        else:
            self.position = (self.hi_page, 0)
            if len(rows) < limit / 2:
                self.window = min(MAX_WINDOW_PAGES, self.window * 2)
        return self.position[0] < self.end_page

    def finish_or_extend(self, conn: sa.Connection) -> bool:
        """Rows the app rewrote during the walk may now sit past the old end: walk on once."""
        if self.rechecked_end:
            return False
        self.rechecked_end = True
        end = self._pages(conn)
        if end > self.end_page:
            self.end_page = end
            return True
        return False

    def progress(self, progress: Progress) -> None:
        progress.unit = "pages"
        progress.done_units = min(self.position[0], self.end_page)
        progress.total_units = self.end_page


def _parse_tid(value: str) -> tuple[int, int]:
    page, item = value.strip("()").split(",")
    return int(page), int(item)


class _ExtendingHeapWalk(_HeapWalk):
    """A heap walk that, at the end, walks once more over pages added while it ran."""

    def __init__(
        self, engine: sa.Engine, table: sa.Table, condition: Sequence[sa.ColumnElement[bool]]
    ) -> None:
        super().__init__(table, condition)
        self.engine = engine

    def advance(self, rows: Sequence[sa.Row[Any]], limit: int) -> bool:
        if super().advance(rows, limit):
            return True
        with self.engine.connect() as conn:
            return self.finish_or_extend(conn)


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
    return _walk(
        engine, "expire_sessions", _ExpireWalk(tables, cutoff), cutoff, options, before_batch
    )


def purge_declines(
    engine: sa.Engine,
    cutoff: datetime,
    options: StepOptions = StepOptions(),
    *,
    retention: timedelta = timedelta(days=7),
    schema: str = "public",
    before_batch: BeforeBatch | None = None,
) -> StepResult:
    """Delete every decline with ``created_at < cutoff - retention``."""
    d = t.reflect(schema).declines
    walk = _ExtendingHeapWalk(engine, d, [d.c.created_at < cutoff - retention])
    return _walk(engine, "purge_declines", walk, cutoff, options, before_batch)


def remove_orphan_fingerprints(
    engine: sa.Engine,
    cutoff: datetime,
    options: StepOptions = StepOptions(),
    *,
    grace: timedelta = timedelta(hours=1),
    schema: str = "public",
    before_batch: BeforeBatch | None = None,
) -> StepResult:
    """Delete fingerprints whose session does not exist, older than ``cutoff - grace``.

    ``NOT EXISTS``, never ``NOT IN``: ``NOT IN`` is empty as soon as one id is NULL, and it
    becomes a rescanning subplan once the session ids outgrow ``work_mem``.
    """
    tables = t.reflect(schema)
    f, s = tables.fingerprints, tables.sessions
    orphan = [
        f.c.session_id.is_not(None),
        f.c.created_at < cutoff - grace,
        ~sa.select(s.c.id).where(s.c.id == f.c.session_id).exists(),
    ]
    walk = _ExtendingHeapWalk(engine, f, orphan)
    return _walk(engine, "remove_orphan_fingerprints", walk, cutoff, options, before_batch)


def database_now(engine: sa.Engine) -> datetime:
    """The database server's ``now()``: the cutoff of a run with no partition or as_of."""
    with engine.connect() as conn:
        value: datetime = conn.execute(sa.select(sa.func.now())).scalar_one()
    return value
