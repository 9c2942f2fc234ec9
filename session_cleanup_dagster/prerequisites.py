"""Checks a step makes before its first batch: tables, columns, types, indexes, privileges.

A nightly job that fails half-way on ``permission denied`` is worse than one that refuses to
start and says which ``GRANT`` is missing. These checks read only the catalog, so they cost a
few milliseconds whatever the table size.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from session_cleanup_dagster import tables as t
from session_cleanup_dagster.errors import PermanentDatabaseError
from session_cleanup_dagster.schema import validate_identifier

TIMESTAMPTZ = "timestamp with time zone"


@dataclass(frozen=True)
class Need:
    """What one step needs of one table."""

    table: str
    columns: dict[str, str]  # column -> information_schema data_type
    privileges: tuple[str, ...]  # table-level privileges
    column_privileges: tuple[tuple[str, str], ...] = ()  # (column, privilege)


# Least privilege, column by column: the job reads only the columns below (never the app's
# coordinates, fingerprint hashes or user ids), so SELECT is needed on those columns only; a
# table-level SELECT satisfies the check too. The heap walks select ``ctid``, a system column
# that needs its own column grant when SELECT is granted per column.
# FOR UPDATE (our row locks) needs UPDATE on at least one column as well as SELECT: that is
# PostgreSQL's rule even when the statement that follows is a DELETE. docs/grants.sql grants
# UPDATE on the id column only for the two tables we delete from.
NEEDS: dict[str, tuple[Need, ...]] = {
    "expire_sessions": (
        Need(
            t.SESSIONS,
            {"id": "uuid", "expires_at": TIMESTAMPTZ, "ended_at": TIMESTAMPTZ},
            (),
            (
                ("id", "SELECT"),
                ("expires_at", "SELECT"),
                ("ended_at", "SELECT"),
                # The batch updates the rows it locked by their row address (ctid).
                ("ctid", "SELECT"),
                ("ended_at", "UPDATE"),
            ),
        ),
    ),
    "purge_declines": (
        Need(
            t.DECLINES,
            {"id": "uuid", "created_at": TIMESTAMPTZ},
            ("DELETE",),
            (("id", "SELECT"), ("created_at", "SELECT"), ("ctid", "SELECT"), ("id", "UPDATE")),
        ),
    ),
    "remove_orphan_fingerprints": (
        Need(
            t.FINGERPRINTS,
            {"id": "uuid", "session_id": "uuid", "created_at": TIMESTAMPTZ},
            ("DELETE",),
            (
                ("id", "SELECT"),
                ("session_id", "SELECT"),
                ("created_at", "SELECT"),
                ("id", "UPDATE"),
            ),
        ),
        Need(t.SESSIONS, {"id": "uuid"}, (), (("id", "SELECT"),)),
    ),
}

# Database-level privileges: (privilege, why). PostgreSQL grants TEMPORARY to PUBLIC on every
# new database, but an installation may revoke it.
DATABASE_PRIVILEGES: dict[str, tuple[tuple[str, str], ...]] = {
    "remove_orphan_fingerprints": (
        (
            "TEMPORARY",
            "the step keeps the session ids it finds orphaned in a temporary table, "
            "on the server, until it has deleted their fingerprints",
        ),
    ),
}


@dataclass(frozen=True)
class Index:
    """An index that keeps a step's total work linear: its table, first column and the fix.

    With ``predicate``, the index should be partial (``WHERE <predicate>``): a full index
    also works, but costs every batch and backlog count an entry per historical row, so it
    only draws a warning.
    """

    table: str
    column: str
    fix: str
    predicate: str | None = None


INDEXES: dict[str, tuple[Index, ...]] = {
    "expire_sessions": (
        Index(
            t.SESSIONS,
            "expires_at",
            f"CREATE INDEX CONCURRENTLY ON {t.SESSIONS} (expires_at) WHERE ended_at IS NULL",
            predicate="ended_at IS NULL",
        ),
    ),
    "remove_orphan_fingerprints": (
        Index(t.SESSIONS, "id", f"ALTER TABLE {t.SESSIONS} ADD PRIMARY KEY (id)"),
        Index(
            t.FINGERPRINTS,
            "session_id",
            f"CREATE INDEX CONCURRENTLY ON {t.FINGERPRINTS} (session_id)",
        ),
    ),
}


def check(conn: sa.Connection, step: str, schema: str = "public") -> list[str]:
    """Raise PermanentDatabaseError naming the first thing ``step`` lacks, with the fix.

    Returns:
        Warnings: what works but costs more than it should, each with its fix.
    """
    validate_identifier(schema, "schema")
    _check_schema(conn, step, schema)
    for need in NEEDS[step]:
        _check_table(conn, step, schema, need)
    for privilege, why in DATABASE_PRIVILEGES.get(step, ()):
        _check_database(conn, step, privilege, why)
    warnings: list[str] = []
    for index in INDEXES.get(step, ()):
        warning = _check_index(conn, step, schema, index)
        if warning:
            warnings.append(warning)
    return warnings


def _check_schema(conn: sa.Connection, step: str, schema: str) -> None:
    # Without USAGE on the schema every later lookup by name fails with a bare "permission
    # denied for schema", so this comes first and names the grant.
    row = conn.execute(
        sa.text(
            "SELECT has_schema_privilege(oid, 'USAGE') AS usage, current_user AS role"
            " FROM pg_catalog.pg_namespace WHERE nspname = :schema"
        ),
        {"schema": schema},
    ).first()
    if row is None:
        raise PermanentDatabaseError(
            f"{step}: schema {schema} does not exist in this database. Point APP_DATABASE_URL "
            "at the app's database (and app_db.db_schema at its schema)."
        )
    if not row.usage:
        raise PermanentDatabaseError(
            f"{step}: role {row.role} lacks USAGE on schema {schema}. Fix: GRANT USAGE ON "
            f"SCHEMA {schema} TO {row.role}; (docs/grants.sql has the full set)."
        )


def _check_table(conn: sa.Connection, step: str, schema: str, need: Need) -> None:
    qualified = f"{schema}.{need.table}"
    exists = conn.execute(
        sa.text(
            "SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n"
            " ON n.oid = c.relnamespace WHERE n.nspname = :schema AND c.relname = :table"
            " AND c.relkind IN ('r', 'p')"
        ),
        {"schema": schema, "table": need.table},
    ).first()
    if exists is None:
        raise PermanentDatabaseError(
            f"{step}: table {qualified} does not exist in this database. Point "
            "APP_DATABASE_URL at the app's database (and app_db.db_schema at its schema)."
        )
    # pg_attribute, not information_schema.columns: the latter hides the columns a role has
    # no privilege on, which would turn a missing GRANT into a misleading "does not exist".
    found: dict[str, str] = {
        row.column_name: row.data_type
        for row in conn.execute(
            sa.text(
                "SELECT a.attname AS column_name, format_type(a.atttypid, NULL) AS data_type"
                " FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c"
                " ON c.oid = a.attrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = :schema AND c.relname = :table AND a.attnum > 0"
                " AND NOT a.attisdropped"
            ),
            {"schema": schema, "table": need.table},
        )
    }
    for column, data_type in need.columns.items():
        if column not in found:
            raise PermanentDatabaseError(
                f"{step}: column {qualified}.{column} does not exist; this job needs it "
                f"as {data_type}. The app's schema differs from the reference schema."
            )
        if found[column] != data_type:
            raise PermanentDatabaseError(
                f"{step}: column {qualified}.{column} is {found[column]}, but this job needs "
                f"{data_type}; comparing it to the cutoff would be wrong, so nothing was done."
            )
    regclass = {"rel": f'"{schema}"."{need.table}"'}
    for privilege in need.privileges:
        allowed = conn.execute(
            sa.text("SELECT has_table_privilege(CAST(:rel AS regclass), :priv)"),
            {**regclass, "priv": privilege},
        ).scalar_one()
        if not allowed:
            raise _privilege_error(conn, step, qualified, privilege, None)
    for column, privilege in need.column_privileges:
        allowed = conn.execute(
            sa.text("SELECT has_column_privilege(CAST(:rel AS regclass), :col, :priv)"),
            {**regclass, "col": column, "priv": privilege},
        ).scalar_one()
        if not allowed:
            raise _privilege_error(conn, step, qualified, privilege, column)


def _check_database(conn: sa.Connection, step: str, privilege: str, why: str) -> None:
    row = conn.execute(
        sa.text(
            "SELECT has_database_privilege(current_database(), :priv) AS allowed,"
            " current_database() AS db, current_user AS role"
        ),
        {"priv": privilege},
    ).one()
    if not row.allowed:
        quoted = '"' + row.db.replace('"', '""') + '"'
        raise PermanentDatabaseError(
            f"{step}: role {row.role} lacks {privilege} on database {row.db} ({why}). Fix: "
            f"GRANT {privilege} ON DATABASE {quoted} TO {row.role}; (docs/grants.sql has "
            "the full set)."
        )


def _privilege_error(
    conn: sa.Connection, step: str, qualified: str, privilege: str, column: str | None
) -> PermanentDatabaseError:
    role = conn.execute(sa.text("SELECT current_user")).scalar_one()
    target = f"{privilege} ({column})" if column else privilege
    why = ""
    if privilege == "UPDATE" and column == "id":
        why = " (row locks need it, even before a DELETE)"
    elif column == "ctid":
        why = " (the step walks the table by physical row address, its ctid)"
    return PermanentDatabaseError(
        f"{step}: role {role} lacks {target} on {qualified}{why}. Fix: "
        f"GRANT {target} ON {qualified} TO {role}; (docs/grants.sql has the full set)."
    )


def _check_index(conn: sa.Connection, step: str, schema: str, index: Index) -> str | None:
    rows = t.indexes_leading_with(conn, f'"{schema}"."{index.table}"', index.column)
    qualified = f"{schema}.{index.table}"
    if not rows:
        raise PermanentDatabaseError(
            f"{step}: no index on {qualified} starts with {index.column}, so every batch would "
            f"scan the table. Fix: {index.fix};"
        )
    if index.predicate is None:
        return None
    wanted = _normalized(index.predicate)
    if any(_normalized(predicate) == wanted for _, predicate in rows if predicate):
        return None
    return (
        f"{step}: the index on {qualified} ({index.column}) is not partial (WHERE "
        f"{index.predicate}), so every batch and backlog count reads an index entry for every "
        f"historical row too. It works, but costs more each night. Fix: {index.fix}; (then "
        "drop the full index if nothing else uses it)"
    )


def _normalized(predicate: str) -> str:
    """``(ended_at IS NULL)`` and ``ended_at is null`` alike: no parentheses, case, spaces."""
    return "".join(ch for ch in predicate.lower() if ch not in "() \t\n")
