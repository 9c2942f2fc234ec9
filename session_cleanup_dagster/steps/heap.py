"""One pass over a table's heap by ctid windows (purge_declines; expire_sessions' backlogs)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
import sqlalchemy.exc
from sqlalchemy.dialects import postgresql as pg

from session_cleanup_dagster import tables as t
from session_cleanup_dagster.steps.loop import (
    FIRST_BATCH,
    CapCheck,
    Progress,
    SafetyCapExceeded,
    StepOptions,
    _Batch,
    _begin_batch,
    _count_and_sample,
    _is_lock_conflict,
    _Pace,
    _sample_array,
    _target_s,
    _timed,
)

# A window never covers more heap than this (64 MiB of 8 KiB pages), so a batch that finds
# few matching rows still reads a bounded amount of data in its transaction.
MAX_WINDOW_PAGES = 8192
# A plain (unbounded) window statement aims at this share of a batch's rows, so a window
# denser than the last one rarely overflows (and is rolled back when it does).
PLAIN_SHARE = 0.6


_UUIDS = pg.ARRAY(pg.UUID)


class TID(sa.types.UserDefinedType[str]):
    """PostgreSQL's ``tid`` (a row's physical address, ``(page,item)``)."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "tid"


def _ctid() -> sa.ColumnElement[str]:
    return sa.literal_column("ctid", TID()).label("ctid")


def _ctid_in(tids: sa.Select[Any]) -> sa.ColumnElement[bool]:
    """``ctid = ANY(ARRAY(subquery))``: planned as a TID scan, one heap fetch per row."""
    return sa.literal_column("ctid", TID()) == sa.any_(
        sa.func.array(tids.scalar_subquery(), type_=pg.ARRAY(TID()))
    )


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


def _parse_tid(value: str) -> tuple[int, int]:
    page, item = value.strip("()").split(",")
    return int(page), int(item)
