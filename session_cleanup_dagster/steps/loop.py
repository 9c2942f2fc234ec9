"""The batch loop shared by every step: options, progress, pacing, one transaction per batch."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import psycopg.errors
import sqlalchemy as sa
import sqlalchemy.exc

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
    sample_ids: tuple[str, ...] = ()  # of the rows a dry run would change; empty otherwise

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
            # Sample ids are shown for dry runs only; a real batch that returned ids would read
            # each changed row's page once more.
            want = SAMPLE_SIZE - len(samples) if options.dry_run else 0
            batch = walk.run_batch(engine, cap, options.dry_run, want, check)
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


def _begin_batch(conn: sa.Connection, off: Sequence[str] = ()) -> None:
    """A writing batch's settings, for its transaction only, in one round trip.

    ``lock_timeout`` is ``FAST_LOCK_TIMEOUT_MS``, and each planner setting in ``off`` is off.
    """
    settings = [(name, "off") for name in off]
    settings.append(("lock_timeout", f"{FAST_LOCK_TIMEOUT_MS}ms"))
    conn.execute(sa.select(*(sa.func.set_config(n, v, sa.true()) for n, v in settings)))


def _target_s(options: StepOptions) -> float | None:
    return options.target_batch_ms / 1000 if options.target_batch_ms else None


def _count_and_sample(source: Any, want: int) -> sa.Select[Any]:
    """How many rows ``source`` has, and up to ``want`` of their ids."""
    counted = sa.select(sa.func.count()).select_from(source).scalar_subquery()
    return sa.select(counted, _sample_array(source, want))


def _sample_array(source: Any, want: int) -> sa.ScalarSelect[Any]:
    """Up to ``want`` ids of ``source`` as one array (never the whole batch)."""
    ids = sa.select(source.c.id).limit(max(0, want)).subquery()
    return sa.select(sa.func.array_agg(ids.c.id)).scalar_subquery()


def _is_lock_conflict(exc: sa.exc.OperationalError) -> bool:
    return isinstance(exc.orig, psycopg.errors.LockNotAvailable | psycopg.errors.DeadlockDetected)


class _Lent:
    """The walk's own connection, lent to a walk that asks an engine for each batch's.

    ``close`` returns it as it was lent: outside a transaction, and open.
    """

    def __init__(self, conn: sa.Connection) -> None:
        self._conn = conn

    def connect(self) -> _Lent:
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def close(self) -> None:
        if not self._conn.invalidated and self._conn.in_transaction():
            self._conn.rollback()

    def __enter__(self) -> _Lent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def database_now(engine: sa.Engine) -> datetime:
    """The database server's ``now()``: the cutoff of a run with no partition or as_of."""
    with engine.connect() as conn:
        value: datetime = conn.execute(sa.select(sa.func.now())).scalar_one()
    return value
