"""How many rows still match a step's condition: the backlog a run leaves, at a bounded cost.

After a clean run this is zero, except rows the app held locked (skipped, left for the next
run). The asset events (assets.py) and the SLO checks (checks.py) both count with ``probe``,
whose cost does not grow without bound with the table:

- ``after_hours_sessions``: the condition (open, ``expires_at`` before a cutoff) is a range of
  the app's partial index on open sessions, and the count stops at ``cap`` + 1 index entries.
- ``after_hours_declines`` and ``device_fingerprints``: the app has no index on
  ``created_at``, so an exact answer needs a pass over the heap. Up to ``exact_max_pages``
  pages (1 GiB by default, the same pass the step itself has just made) the count is exact;
  past that it reads a ``TABLESAMPLE SYSTEM`` sample of ``sample_pages`` whole pages
  (32 MiB) and scales the hits up, and the result says it is an estimate. A different random
  sample each time, so a leftover that one sample misses is seen by a later one. The
  orphans' condition probes the sessions' primary key for every sampled row, so a sample of
  fingerprints costs some 135 pages a page: ``probing_sample_pages`` sizes it apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

from session_cleanup_dagster import tables as t
from session_cleanup_dagster.contract import GRACE, RETENTION

EXACT_MAX_PAGES = 131_072  # 1 GiB of 8 KiB pages
SAMPLE_PAGES = 4096  # 32 MiB
COUNT_CAP = 1_000_000

Where = Callable[[sa.FromClause], list[sa.ColumnElement[bool]]]


@dataclass(frozen=True)
class Count:
    """Rows matching a condition, and how that number was obtained."""

    rows: int
    exact: bool
    capped: bool
    method: str
    sample_ids: tuple[str, ...] = ()


def _target(
    step: str, cutoff: datetime, retention: timedelta, grace: timedelta, schema: str
) -> tuple[sa.Table, Where, Where | None]:
    """The table, the step's condition over it, and the condition for a sample (if sampled)."""
    tables = t.reflect(schema)
    s = tables.sessions
    if step == "expire_sessions":
        return s, lambda x: [x.c.ended_at.is_(None), x.c.expires_at < cutoff], None
    if step == "purge_declines":
        due: Where = lambda x: [x.c.created_at < cutoff - retention]  # noqa: E731
        return tables.declines, due, due
    if step == "remove_orphan_fingerprints":

        def orphan(x: sa.FromClause, *, fenced: bool = False) -> list[sa.ColumnElement[bool]]:
            session = sa.select(sa.literal(1)).where(s.c.id == x.c.session_id)
            # OFFSET 0 keeps NOT EXISTS a per-row probe of the sessions primary key. Without
            # it the planner may pick a hash anti-join that reads every session, so a small
            # sample of fingerprints would still cost a pass over the sessions table.
            probe = session.offset(0) if fenced else session
            return [
                x.c.session_id.is_not(None),
                x.c.created_at < cutoff - grace,
                ~probe.exists(),
            ]

        return tables.fingerprints, orphan, lambda x: orphan(x, fenced=True)
    raise ValueError(f"unknown step {step!r}")


def probe(
    conn: sa.Connection,
    step: str,
    cutoff: datetime,
    *,
    retention: timedelta = RETENTION,
    grace: timedelta = GRACE,
    schema: str = "public",
    samples: int = 0,
    cap: int = COUNT_CAP,
    exact_max_pages: int = EXACT_MAX_PAGES,
    sample_pages: int = SAMPLE_PAGES,
    sample_indexed: bool = False,
    probing_sample_pages: int | None = None,
) -> Count:
    """Count the rows ``step`` would change at ``cutoff``, with up to ``samples`` of their ids.

    ``sample_indexed``: sample the sessions too once their table passes ``exact_max_pages``.
    Right after expire_sessions ended many sessions, the partial index still holds their
    entries until vacuum, and counting through them reads a heap row each (1.0 s at L).

    ``probing_sample_pages``: the sample's size where the condition probes another table for
    each sampled row (the orphans: a descent of the sessions' primary key per fingerprint,
    about 3 pages each, so a page of 45 fingerprints costs some 135 pages). Default:
    ``sample_pages``.
    """
    table, where, sampled_where = _target(step, cutoff, retention, grace, schema)
    indexed = sampled_where is None
    if step == "remove_orphan_fingerprints" and probing_sample_pages is not None:
        sample_pages = probing_sample_pages
    if indexed and sample_indexed:
        sampled_where = where
    pages = 0 if sampled_where is None else t.relation_pages(conn, table)
    if sampled_where is None or pages <= exact_max_pages:
        limited = sa.select(sa.literal(1)).select_from(table).where(*where(table)).limit(cap + 1)
        found = int(
            conn.execute(sa.select(sa.func.count()).select_from(limited.subquery())).scalar_one()
        )
        ids: tuple[str, ...] = ()
        if found and samples:
            query = sa.select(table.c.id).where(*where(table)).limit(samples)
            ids = tuple(str(i) for i in conn.execute(query).scalars())
        method = (
            "exact, from the partial index on open sessions"
            if indexed
            else f"exact, one pass over {pages} pages"
        )
        if found > cap:
            method += f", stopped counting at {cap}"
        return Count(min(found, cap), exact=True, capped=found > cap, method=method, sample_ids=ids)
    percent = min(100.0, 100.0 * sample_pages / pages)
    sample = sa.tablesample(table, sa.func.system(percent), name="sampled")
    hits = int(
        conn.execute(
            sa.select(sa.func.count()).select_from(sample).where(*where(sample))
        ).scalar_one()
    )
    ids = ()
    if hits and samples:
        query = sa.select(sample.c.id).where(*where(sample)).limit(samples)
        ids = tuple(str(i) for i in conn.execute(query).scalars())
    return Count(
        rows=round(hits * 100.0 / percent),
        exact=False,
        capped=False,
        method=f"estimate from a {percent:.2g}% page sample of {pages} pages ({hits} rows seen)",
        sample_ids=ids,
    )


def backlog(
    engine: sa.Engine,
    cutoff: datetime,
    *,
    retention: timedelta = RETENTION,
    grace: timedelta = GRACE,
    schema: str = "public",
) -> dict[str, int]:
    """Rows each step would still change at ``cutoff``, keyed by step name: exact, uncapped.

    For the demo and the benchmarks' end-state checks; it reads whole tables in one statement.
    """
    steps = ("expire_sessions", "purge_declines", "remove_orphan_fingerprints")
    with engine.connect() as conn:
        return {
            # Never capped, never sampled.
            step: probe(
                conn,
                step,
                cutoff,
                retention=retention,
                grace=grace,
                schema=schema,
                cap=2**62,
                exact_max_pages=2**62,
            ).rows
            for step in steps
        }
