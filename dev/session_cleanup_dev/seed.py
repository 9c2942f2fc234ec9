"""Deterministic synthetic data for the reference schema, for tests, the demo and benchmarks.

The rows are a pure function of ``(users, seed, anchor)``; :mod:`session_cleanup_dev.seed_sql`
describes their shape and holds the SQL that makes them. The seeder fills only a database that
holds no rows at all: pointed at the wrong URL, it refuses before it writes anything.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from session_cleanup_dagster.contract import GRACE, RETENTION
from session_cleanup_dagster.schema import (
    TABLES,
    create_constraints_and_indexes,
    create_reference_schema,
    create_tables,
    existing_tables,
    quoted_identifier,
)
from session_cleanup_dev.seed_sql import BOUNDARY_EVERY, TINY, inserts

__all__ = [
    "MIN_USERS",
    "SCALES",
    "parse_scale",
    "seed_database",
    "table_counts",
]

SCALES: dict[str, int] = {"XS": 10_000, "S": 200_000, "L": 1_000_000}
"""Named benchmark scales: number of users."""

MIN_USERS = 6
"""Each user declines five distinct other users, so fewer users cannot satisfy the shape."""

_TABLES = """
SELECT format('%I.%I', n.nspname, c.relname), has_table_privilege(c.oid, 'SELECT')
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_%'
ORDER BY 1
"""


def _tables_with_rows(conn: sa.Connection) -> list[str]:
    """The database's tables, in any schema, that hold rows or that this role cannot read."""
    held = []
    # The names come from the catalog, quoted by format('%I.%I').
    for name, readable in conn.execute(sa.text(_TABLES)).all():
        if not readable or conn.execute(sa.text(f"SELECT EXISTS (SELECT FROM {name})")).scalar():
            held.append(name)
    return held


def parse_scale(value: str) -> int:
    """Turn a scale name or a user count into a number of users.

    Args:
        value: ``XS``, ``S`` or ``L`` (any case), or a positive integer such as ``"5000"``.

    Returns:
        The number of users.

    Raises:
        ValueError: If ``value`` is neither a known scale name nor a positive integer.
    """
    text = value.strip()
    named = SCALES.get(text.upper())
    if named is not None:
        return named
    try:
        users = int(text)
    except ValueError:
        users = 0
    if users <= 0:
        names = ", ".join(f"{name} ({count})" for name, count in SCALES.items())
        raise ValueError(f"invalid scale {value!r}: expected one of {names} or a positive integer")
    return users


def _count_rows(conn: sa.Connection, schema: str) -> dict[str, int]:
    """Count the rows of the four reference tables on an open connection."""
    quoted = quoted_identifier(conn, schema)
    counts: dict[str, int] = {}
    for table in TABLES:
        # The table names are our own constants; only the schema came from the caller.
        sql = f"SELECT count(*) FROM {quoted}.{quoted_identifier(conn, table)}"
        counts[table] = int(conn.execute(sa.text(sql)).scalar_one())
    return counts


def table_counts(engine: sa.Engine, schema: str = "public") -> dict[str, int]:
    """Count the rows of the four reference tables.

    Args:
        engine: Engine for the database holding the reference schema.
        schema: The schema the tables live in.

    Returns:
        Row count per table name, in :data:`~session_cleanup_dagster.schema.TABLES` order.

    Raises:
        ValueError: If ``schema`` is not a valid identifier.
    """
    with engine.connect() as conn:
        return _count_rows(conn, schema)


def _normalise_anchor(anchor: datetime | None) -> datetime:
    """Return ``anchor`` in UTC, defaulting to now truncated to the second."""
    if anchor is None:
        return datetime.now(UTC).replace(microsecond=0)
    if anchor.tzinfo is None or anchor.utcoffset() is None:
        raise ValueError("anchor must be timezone-aware (e.g. datetime(..., tzinfo=UTC))")
    return anchor.astimezone(UTC)


def seed_database(
    engine: sa.Engine,
    users: int,
    *,
    anchor: datetime | None = None,
    seed: int = 0,
    schema: str = "public",
    create_schema: bool = True,
) -> dict[str, int]:
    """Fill the reference schema with deterministic synthetic data for ``users`` users.

    The rows are a pure function of ``(users, seed, anchor)`` (:mod:`session_cleanup_dev.seed_sql`
    describes their shape). All four inserts run in one transaction, so a failure leaves the tables
    empty; ANALYZE runs afterwards so the planner sees realistic statistics straight away.

    Args:
        engine: Engine for the target database (a ``postgresql+psycopg`` URL).
        users: Number of users ``N``; at least :data:`MIN_USERS`.
        anchor: The instant the data is relative to, normally the cleanup cutoff ``T`` that
            a test or benchmark will use. Must be timezone-aware. Defaults to now (UTC),
            truncated to the second.
        seed: Seed for the pseudo-random values; different seeds give different data.
        schema: The schema holding (or to hold) the reference tables.
        create_schema: Create the reference schema first if it is missing.

    Returns:
        Row count per table name after seeding.

    Raises:
        ValueError: If an argument is invalid, or any table in the database holds rows.
    """
    if isinstance(users, bool) or not isinstance(users, int) or users < MIN_USERS:
        raise ValueError(f"users must be an integer >= {MIN_USERS}, got {users!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed must be an integer that fits in a bigint, got {seed!r}")
    anchor_utc = _normalise_anchor(anchor)
    quoted = quoted_identifier(engine, schema)

    params: dict[str, Any] = {
        "users": users,
        "fingerprints": users * 3 // 2,
        "seed": seed,
        "anchor": anchor_utc,
        # Computed in Python so the cutoffs are exact durations, independent of the session's
        # TimeZone (interval '7 days' would follow DST transitions in a non-UTC session).
        "retention_cutoff": anchor_utc - RETENTION,
        "grace_cutoff": anchor_utc - GRACE,
        "tiny": TINY,
        "every": BOUNDARY_EVERY,
    }
    with engine.begin() as conn:
        holding = _tables_with_rows(conn)
        if holding:
            more = f" and {len(holding) - 5} more" if len(holding) > 5 else ""
            raise ValueError(
                f"the database already holds rows (in {', '.join(holding[:5])}{more}); the "
                "seeder fills only a new, empty database: create one (createdb, or CREATE "
                "DATABASE) and pass its URL"
            )
        present = existing_tables(conn, schema)
        # Fresh tables get their keys and indexes only after the load, in this same
        # transaction: one index build or foreign-key validation per object instead of one
        # index insert or trigger per row makes seeding several times faster at scale S.
        bulk_load = create_schema and not present
        if bulk_load:
            create_tables(conn, schema)
        elif create_schema:
            create_reference_schema(conn, schema)
        elif present != set(TABLES):
            missing = ", ".join(sorted(set(TABLES) - present))
            raise ValueError(
                f"schema {schema!r} lacks tables {missing}; pass create_schema=True to create them"
            )
        # Losing these rows to a crash is harmless (the seeding is simply redone), so skip
        # waiting for the WAL flush at commit, and give the index builds room to sort. The
        # engine may carry the job's per-statement limits (resources.make_engine); a bulk load
        # at scale L legitimately runs longer than those, so lift them for this transaction.
        conn.execute(sa.text("SET LOCAL synchronous_commit = off"))
        conn.execute(sa.text("SET LOCAL maintenance_work_mem = '256MB'"))
        conn.execute(sa.text("SET LOCAL statement_timeout = 0"))
        for statement in inserts(quoted):
            conn.execute(sa.text(statement), params)
        if bulk_load:
            create_constraints_and_indexes(conn, schema)

    with engine.begin() as conn:
        tables = ", ".join(f"{quoted}.{quoted_identifier(conn, table)}" for table in TABLES)
        conn.execute(sa.text(f"ANALYZE {tables}"))

    return table_counts(engine, schema)
