"""SQLAlchemy Core descriptions of the app's tables: only the columns this job touches.

The app owns the schema; these objects only let SQLAlchemy build and quote our statements.
They are declared, not reflected, so building them needs no database connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

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
