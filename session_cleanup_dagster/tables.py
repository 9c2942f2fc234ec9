"""SQLAlchemy Core descriptions of the app's tables: only the columns this job touches.

The app owns the schema; these objects only let SQLAlchemy build and quote our statements.
They are declared, not reflected, so building them needs no database connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from session_cleanup_dagster.schema import validate_identifier

SESSIONS = "after_hours_sessions"
DECLINES = "after_hours_declines"
FINGERPRINTS = "device_fingerprints"
USERS = "users"


@dataclass(frozen=True)
class Tables:
    """The three tables the steps change (users is only ever referenced)."""

    sessions: sa.Table
    declines: sa.Table
    fingerprints: sa.Table


@lru_cache(maxsize=16)
def reflect(schema: str = "public") -> Tables:
    """The table objects for ``schema`` (validated, then quoted by SQLAlchemy when used)."""
    validate_identifier(schema, "schema")
    metadata = sa.MetaData(schema=schema)
    tz = sa.DateTime(timezone=True)
    sessions = sa.Table(
        SESSIONS,
        metadata,
        sa.Column("id", pg.UUID, primary_key=True),
        sa.Column("expires_at", tz),
        sa.Column("ended_at", tz),
    )
    declines = sa.Table(
        DECLINES,
        metadata,
        sa.Column("id", pg.UUID, primary_key=True),
        sa.Column("created_at", tz),
    )
    fingerprints = sa.Table(
        FINGERPRINTS,
        metadata,
        sa.Column("id", pg.UUID, primary_key=True),
        sa.Column("session_id", pg.UUID),
        sa.Column("created_at", tz),
    )
    return Tables(sessions=sessions, declines=declines, fingerprints=fingerprints)


def qualified_name(conn: sa.Connection, table: sa.Table) -> str:
    """``"schema"."table"``, quoted by the dialect, for use as a bound ``regclass`` value."""
    preparer = conn.dialect.identifier_preparer
    return preparer.format_table(table)


def relation_pages(conn: sa.Connection, table: sa.Table) -> int:
    """The table's size in pages right now: a stat of its files, not a scan."""
    return int(
        conn.execute(
            sa.text(
                "SELECT pg_relation_size(CAST(:name AS regclass))"
                " / current_setting('block_size')::int"
            ),
            {"name": qualified_name(conn, table)},
        ).scalar_one()
    )


def planner_estimate(conn: sa.Connection, table: sa.Table) -> tuple[float, int]:
    """``pg_class``'s (reltuples, relpages): the planner's last estimate, negative if none."""
    row = conn.execute(
        sa.text("SELECT reltuples, relpages FROM pg_class WHERE oid = CAST(:name AS regclass)"),
        {"name": qualified_name(conn, table)},
    ).one()
    return float(row.reltuples), int(row.relpages)


def indexes_leading_with(conn: sa.Connection, table: str, column: str) -> list[tuple[str, str]]:
    """The valid indexes of ``table`` (a ``regclass`` name) whose first column is ``column``.

    Each as (access method, predicate): ``("btree", "")`` for a whole-table B-tree index.
    """
    rows = conn.execute(
        sa.text(
            "SELECT am.amname, coalesce(pg_catalog.pg_get_expr(i.indpred, i.indrelid), '')"
            " FROM pg_catalog.pg_index i"
            " JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid"
            " JOIN pg_catalog.pg_am am ON am.oid = ic.relam"
            " JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]"
            " WHERE i.indrelid = CAST(:name AS regclass) AND a.attname = :column AND i.indisvalid"
        ),
        {"name": table, "column": column},
    )
    return [(str(am), str(predicate)) for am, predicate in rows]


def relation_oids(conn: sa.Connection, *tables: sa.Table) -> list[int]:
    """The oids of ``tables`` and of each of their indexes (for ``pages_touched``)."""
    names = [qualified_name(conn, table) for table in tables]
    rows = conn.execute(
        sa.text(
            "SELECT c.oid FROM pg_catalog.pg_class c"
            " WHERE c.oid = ANY(CAST(:names AS regclass[]))"
            " UNION ALL SELECT i.indexrelid FROM pg_catalog.pg_index i"
            " WHERE i.indrelid = ANY(CAST(:names AS regclass[]))"
        ),
        {"names": names},
    )
    return [int(row[0]) for row in rows]


def pages_touched(conn: sa.Connection, oids: list[int]) -> int:
    """Pages this backend has requested of these relations since its stats were last sent.

    Buffer hits plus reads (``pg_stat_get_xact_blocks_fetched``). The counters are sent to
    the statistics system only between transactions, so the difference of two readings in
    one transaction is exactly what the statements between them touched.
    """
    if not oids:
        return 0
    return int(
        conn.execute(
            sa.text(
                "SELECT coalesce(sum(pg_catalog.pg_stat_get_xact_blocks_fetched(o)), 0)"
                " FROM unnest(CAST(:oids AS oid[])) AS o"
            ),
            {"oids": oids},
        ).scalar_one()
    )


def no_session(
    sessions: sa.Table, key: sa.ColumnElement[Any], *, fenced: bool = False
) -> sa.ColumnElement[bool]:
    """No session has the id ``key`` (``NOT EXISTS``, a probe of the primary key).

    ``fenced``: with ``OFFSET 0``, which keeps it a per-row probe: never pulled up into an
    anti-join, which the planner may run as a hash join reading every session.
    """
    session = sa.select(sessions.c.id).where(sessions.c.id == key)
    return ~(session.offset(0) if fenced else session).exists()
