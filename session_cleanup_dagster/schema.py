"""The app's reference schema, as described in ``DESIGN.md``.

The project never migrates a production database: the app owns its schema. This module only
exists so tests, the demo and the benchmarks can build an identical copy of it in a scratch
database or schema.
"""

from __future__ import annotations

import re

import sqlalchemy as sa

__all__ = [
    "IDENTIFIER_PATTERN",
    "TABLES",
    "create_constraints_and_indexes",
    "create_reference_schema",
    "create_tables",
    "existing_tables",
    "quoted_identifier",
    "validate_identifier",
]

TABLES: tuple[str, ...] = (
    "users",
    "after_hours_sessions",
    "after_hours_declines",
    "device_fingerprints",
)
"""The four tables, in dependency order (referenced tables first)."""

IDENTIFIER_PATTERN = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
"""Identifiers we accept: lower-case, unquoted-style and within PostgreSQL's 63-byte limit."""

# Templates whose only placeholder is the quoted schema name. Values never go into these
# strings; the schema name is validated and quoted before it is substituted.
#
# Tables, constraints and indexes are kept apart so seed.py can bulk-load fresh tables before
# any key exists (building an index or validating a foreign key once is far cheaper than
# maintaining it row by row), while create_reference_schema() runs the very same statements
# back to back. Both paths therefore produce an identical catalog.
_TABLE_DDL: tuple[str, ...] = (
    """
    CREATE TABLE IF NOT EXISTS {schema}.users (
        id varchar(255) NOT NULL,
        created_at timestamptz
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS {schema}.after_hours_sessions (
        id uuid NOT NULL DEFAULT gen_random_uuid(),
        user_id varchar(255) NOT NULL,
        started_at timestamptz DEFAULT now(),
        expires_at timestamptz NOT NULL,
        ended_at timestamptz NULL,
        latitude numeric(10, 8) NOT NULL,
        longitude numeric(11, 8) NOT NULL,
        fuzzed_latitude numeric(10, 8) NOT NULL,
        fuzzed_longitude numeric(11, 8) NOT NULL,
        created_at timestamptz DEFAULT now()
    )
    """,
    # DESIGN.md gives no default for this id (unlike the sessions id), so none is added here.
    """
    CREATE TABLE IF NOT EXISTS {schema}.after_hours_declines (
        id uuid NOT NULL,
        session_id uuid NOT NULL,
        user_id varchar(255) NOT NULL,
        declined_user_id varchar(255) NOT NULL,
        created_at timestamptz DEFAULT now(),
        decline_count int DEFAULT 1,
        first_declined_at timestamptz,
        last_session_id uuid
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS {schema}.device_fingerprints (
        id uuid NOT NULL,
        user_id varchar(255) NULL,
        session_id uuid NULL,
        fingerprint_hash text NOT NULL,
        created_at timestamptz DEFAULT now()
    )
    """,
)

# (table, constraint name, definition). Primary and unique keys come first because the
# foreign keys need the referenced unique indexes to exist.
_CONSTRAINTS: tuple[tuple[str, str, str], ...] = (
    ("users", "users_pkey", "PRIMARY KEY (id)"),
    ("after_hours_sessions", "after_hours_sessions_pkey", "PRIMARY KEY (id)"),
    ("after_hours_declines", "after_hours_declines_pkey", "PRIMARY KEY (id)"),
    (
        "after_hours_declines",
        "after_hours_declines_user_id_declined_user_id_key",
        "UNIQUE (user_id, declined_user_id)",
    ),
    ("device_fingerprints", "device_fingerprints_pkey", "PRIMARY KEY (id)"),
    (
        "after_hours_sessions",
        "after_hours_sessions_user_id_fkey",
        "FOREIGN KEY (user_id) REFERENCES {schema}.users (id) ON DELETE CASCADE",
    ),
    (
        "after_hours_declines",
        "after_hours_declines_session_id_fkey",
        "FOREIGN KEY (session_id) REFERENCES {schema}.after_hours_sessions (id) ON DELETE CASCADE",
    ),
    (
        "after_hours_declines",
        "after_hours_declines_user_id_fkey",
        "FOREIGN KEY (user_id) REFERENCES {schema}.users (id) ON DELETE CASCADE",
    ),
    (
        "after_hours_declines",
        "after_hours_declines_declined_user_id_fkey",
        "FOREIGN KEY (declined_user_id) REFERENCES {schema}.users (id) ON DELETE CASCADE",
    ),
    # device_fingerprints.session_id has no foreign key on purpose: the app writes fingerprints
    # before (or without) the session row, which is why orphans exist and need cleaning up.
)

_INDEX_DDL: tuple[str, ...] = (
    # The app enforces "one open session per user" with this partial unique index.
    """
    CREATE UNIQUE INDEX IF NOT EXISTS after_hours_sessions_one_open_per_user
        ON {schema}.after_hours_sessions (user_id)
        WHERE ended_at IS NULL
    """,
    # The app's own index for finding open sessions by expiry; expire_sessions relies on it.
    """
    CREATE INDEX IF NOT EXISTS after_hours_sessions_open_expires_idx
        ON {schema}.after_hours_sessions (expires_at)
        WHERE ended_at IS NULL
    """,
    # Deliberately no index on after_hours_declines.created_at: the app's schema has none, and
    # purge_declines has to perform well without one.
    """
    CREATE INDEX IF NOT EXISTS after_hours_declines_session_id_idx
        ON {schema}.after_hours_declines (session_id)
    """,
    """
    CREATE INDEX IF NOT EXISTS after_hours_declines_user_id_idx
        ON {schema}.after_hours_declines (user_id)
    """,
    """
    CREATE INDEX IF NOT EXISTS device_fingerprints_session_id_idx
        ON {schema}.device_fingerprints (session_id)
    """,
)

_CONSTRAINT_EXISTS_SQL = """
SELECT 1
FROM pg_catalog.pg_constraint AS c
JOIN pg_catalog.pg_class AS t ON t.oid = c.conrelid
JOIN pg_catalog.pg_namespace AS n ON n.oid = t.relnamespace
WHERE n.nspname = :schema AND t.relname = :table AND c.conname = :name
"""


def validate_identifier(name: str, what: str = "identifier") -> str:
    """Accept only a plain lower-case SQL identifier; anything else is refused, never quoted in.

    The one check for every name this project puts into SQL text (schemas, databases).

    Args:
        name: A schema, table or database name supplied by a caller.
        what: What the name is, for the message (``"app_db.db_schema"``, ``"schema"``).

    Returns:
        ``name`` unchanged, so the call can be used inline.

    Raises:
        ValueError: naming the offending value and what is valid.
    """
    if not isinstance(name, str) or not IDENTIFIER_PATTERN.fullmatch(name):
        raise ValueError(
            f"{what} {name!r} is not a plain identifier: use lower-case letters, digits and "
            "underscores, starting with a letter or underscore, at most 63 characters."
        )
    return name


def quoted_identifier(bind: sa.Connection | sa.Engine, name: str) -> str:
    """Validate ``name`` and quote it for use in SQL text on ``bind``'s dialect.

    Identifiers cannot be bind parameters, so they are the one thing we put into SQL strings;
    validating first means quoting only has to deal with reserved words such as ``user``.

    Args:
        bind: The connection or engine whose dialect does the quoting.
        name: The identifier to validate and quote.

    Returns:
        The identifier, quoted if the dialect requires it.

    Raises:
        ValueError: If ``name`` is not a valid identifier.
    """
    return bind.dialect.identifier_preparer.quote(validate_identifier(name))


def existing_tables(conn: sa.Connection, schema: str = "public") -> set[str]:
    """Return which of the reference :data:`TABLES` already exist in ``schema``.

    Args:
        conn: An open connection.
        schema: The PostgreSQL schema to look in.

    Returns:
        The names of the reference tables present (possibly empty).

    Raises:
        ValueError: If ``schema`` is not a valid identifier.
    """
    validate_identifier(schema)
    rows = conn.execute(
        sa.text(
            "SELECT c.relname FROM pg_catalog.pg_class AS c"
            " JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace"
            " WHERE n.nspname = :schema AND c.relname = ANY(:tables)"
            " AND c.relkind IN ('r', 'p')"
        ),
        {"schema": schema, "tables": list(TABLES)},
    )
    return {str(name) for name in rows.scalars()}


def create_tables(conn: sa.Connection, schema: str = "public") -> None:
    """Create the schema and the four tables, without keys or indexes, if missing.

    Only useful immediately before a bulk load that is followed by
    :func:`create_constraints_and_indexes` in the same transaction; everything else should
    call :func:`create_reference_schema`.

    Args:
        conn: An open connection; the caller owns the transaction.
        schema: The PostgreSQL schema to create the tables in.

    Raises:
        ValueError: If ``schema`` is not a valid identifier.
    """
    quoted = quoted_identifier(conn, schema)
    # CREATE SCHEMA IF NOT EXISTS still requires CREATE on the database even when the schema
    # exists (e.g. "public" for an unprivileged role), so only issue it when it is missing.
    exists = conn.execute(
        sa.text("SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = :name"),
        {"name": schema},
    ).scalar()
    if exists is None:
        conn.execute(sa.text(f"CREATE SCHEMA {quoted}"))
    for statement in _TABLE_DDL:
        conn.execute(sa.text(statement.format(schema=quoted)))


def create_constraints_and_indexes(conn: sa.Connection, schema: str = "public") -> None:
    """Add the reference keys, foreign keys and indexes that are missing.

    Args:
        conn: An open connection; the caller owns the transaction.
        schema: The PostgreSQL schema holding the four tables.

    Raises:
        ValueError: If ``schema`` is not a valid identifier.
    """
    quoted = quoted_identifier(conn, schema)
    for table, name, definition in _CONSTRAINTS:
        # ALTER TABLE ... ADD CONSTRAINT has no IF NOT EXISTS, so look it up first.
        exists = conn.execute(
            sa.text(_CONSTRAINT_EXISTS_SQL), {"schema": schema, "table": table, "name": name}
        ).scalar()
        if exists is None:
            conn.execute(
                sa.text(
                    f"ALTER TABLE {quoted}.{quoted_identifier(conn, table)}"
                    f" ADD CONSTRAINT {quoted_identifier(conn, name)}"
                    f" {definition.format(schema=quoted)}"
                )
            )
    for statement in _INDEX_DDL:
        conn.execute(sa.text(statement.format(schema=quoted)))


def create_reference_schema(conn: sa.Connection, schema: str = "public") -> None:
    """Create the reference schema (schema, four tables, keys and indexes) if missing.

    Every step checks for existing objects, so calling this on an existing copy is a no-op.
    The caller owns the transaction: use ``with engine.begin() as conn`` to have it committed.

    Args:
        conn: An open connection to a PostgreSQL 13+ database (``gen_random_uuid()`` is
            built in from 13 on).
        schema: The PostgreSQL schema to create the tables in.

    Raises:
        ValueError: If ``schema`` is not a valid identifier.
    """
    create_tables(conn, schema)
    create_constraints_and_indexes(conn, schema)
