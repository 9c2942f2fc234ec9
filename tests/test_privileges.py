"""Least privilege: the job under exactly docs/grants.sql, and each missing privilege.

Touches: docs/grants.sql, session_cleanup_dagster.prerequisites and the whole job through
execute_in_process, on a fresh database per test and a uniquely named role that is dropped
afterwards. The shared server trusts local connections, so the role needs no password here;
what is under test is what the role may do once connected.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy.exc

from session_cleanup_dagster import prerequisites, steps
from tests import data, model, pg
from tests.data import T
from tests.jobrun import OPS, attempts, failure_message, run_job

GRANTS = Path(__file__).resolve().parent.parent / "docs" / "grants.sql"


def grants_sql(role: str) -> str:
    """docs/grants.sql for ``role`` (the file names the role session_cleanup)."""
    return re.sub(r"\bsession_cleanup\b", role, GRANTS.read_text())


@pytest.fixture
def role(app_url: str) -> Iterator[str]:
    """A fresh role with exactly docs/grants.sql's privileges on app_url's database."""
    name = f"sct_job_{uuid.uuid4().hex[:12]}"
    data.boundaries(app_url)
    with psycopg.connect(app_url, autocommit=True) as conn:
        conn.execute(grants_sql(name).encode())
    try:
        yield name
    finally:
        pg.execute(app_url, f'DROP OWNED BY "{name}"')
        pg.execute(app_url, f'DROP ROLE "{name}"')


def privileges(url: str, role: str) -> set[tuple[str, ...]]:
    """Every privilege ``role`` holds on tables and columns of the database, and the schema."""
    with psycopg.connect(url) as conn:
        tables = conn.execute(
            "SELECT table_name, privilege_type FROM information_schema.table_privileges"
            " WHERE grantee = %s",
            (role,),
        ).fetchall()
        # attacl, not information_schema.column_privileges: the latter also lists every column
        # of a table with a table-level privilege, and it leaves out system columns (ctid).
        columns = conn.execute(
            "SELECT c.relname, a.attname, p.privilege_type FROM pg_attribute a"
            " JOIN pg_class c ON c.oid = a.attrelid,"
            " LATERAL aclexplode(a.attacl) p WHERE p.grantee = %s::regrole",
            (role,),
        ).fetchall()
        schema = conn.execute(
            "SELECT has_schema_privilege(%s, 'public', 'USAGE'),"
            " has_schema_privilege(%s, 'public', 'CREATE')",
            (role, role),
        ).fetchone()
    assert schema is not None
    found: set[tuple[str, ...]] = {("table", t, p) for t, p in tables}
    found |= {("column", t, c, p) for t, c, p in columns}
    found |= {("schema", p) for p, held in zip(("USAGE", "CREATE"), schema, strict=True) if held}
    return found


def test_grants_sql_gives_only_what_the_job_needs(app_url: str, role: str) -> None:
    assert privileges(app_url, role) == {
        ("schema", "USAGE"),
        ("table", "after_hours_declines", "DELETE"),
        ("table", "device_fingerprints", "DELETE"),
        ("column", "after_hours_sessions", "id", "SELECT"),
        ("column", "after_hours_sessions", "expires_at", "SELECT"),
        ("column", "after_hours_sessions", "ended_at", "SELECT"),
        ("column", "after_hours_sessions", "ctid", "SELECT"),
        ("column", "after_hours_sessions", "ended_at", "UPDATE"),
        ("column", "after_hours_declines", "id", "SELECT"),
        ("column", "after_hours_declines", "created_at", "SELECT"),
        ("column", "after_hours_declines", "ctid", "SELECT"),
        ("column", "after_hours_declines", "id", "UPDATE"),
        ("column", "device_fingerprints", "id", "SELECT"),
        ("column", "device_fingerprints", "session_id", "SELECT"),
        ("column", "device_fingerprints", "created_at", "SELECT"),
        ("column", "device_fingerprints", "id", "UPDATE"),
    }


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT latitude, longitude FROM after_hours_sessions",
        "SELECT fingerprint_hash FROM device_fingerprints",
        "SELECT user_id FROM after_hours_declines",
        "SELECT id FROM users",
        "INSERT INTO device_fingerprints (id, fingerprint_hash) VALUES (gen_random_uuid(), 'x')",
        "UPDATE after_hours_sessions SET expires_at = now()",
        "DELETE FROM after_hours_sessions",
        "TRUNCATE after_hours_declines",
        "CREATE TABLE public.sct_intruder (id int)",
    ],
)
def test_the_job_role_cannot_read_personal_data_or_change_anything_else(
    app_url: str, role: str, sql: str
) -> None:
    with (
        psycopg.connect(pg.as_role(app_url, role)) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute(sql.encode())


def test_job_runs_under_exactly_the_grants_in_docs(app_url: str, role: str) -> None:
    before = pg.snapshot(app_url)
    result = run_job(pg.as_role(app_url, role), partition_key="2026-11-27")
    assert result.success
    assert pg.snapshot(app_url) == model.cleanup(before, T)


def _revocations() -> list[tuple[str, str, str | None, str]]:
    """(table, privilege, column or None, revoke statement) for every privilege the job needs."""
    found: dict[tuple[str, str, str | None], str] = {}
    for needs in prerequisites.NEEDS.values():
        for need in needs:
            for privilege in need.privileges:
                found[(need.table, privilege, None)] = (
                    f"REVOKE {privilege} ON public.{need.table} FROM {{role}}"
                )
            for column, privilege in need.column_privileges:
                found[(need.table, privilege, column)] = (
                    f"REVOKE {privilege} ({column}) ON public.{need.table} FROM {{role}}"
                )
    return [(table, privilege, column, sql) for (table, privilege, column), sql in found.items()]


def _needs(op: str, table: str, privilege: str, column: str | None) -> bool:
    for need in prerequisites.NEEDS[op]:
        if need.table != table:
            continue
        if column is None and privilege in need.privileges:
            return True
        if (column, privilege) in need.column_privileges:
            return True
    return False


def _call_step(op: str, engine):
    if op == "expire_sessions":
        return steps.expire_sessions(engine, T)
    if op == "purge_declines":
        return steps.purge_declines(engine, T)
    return steps.remove_orphan_fingerprints(engine, T)


@pytest.mark.parametrize(
    ("table", "privilege", "column", "revoke"),
    _revocations(),
    ids=lambda value: str(value).split(" ON ")[0] if isinstance(value, str) else None,
)
def test_each_missing_privilege_fails_fast_naming_the_grant(
    app_url: str, role: str, table: str, privilege: str, column: str | None, revoke: str
) -> None:
    pg.execute(app_url, revoke.format(role=role))
    before = pg.snapshot(app_url)
    result = run_job(pg.as_role(app_url, role), partition_key="2026-11-27")
    assert not result.success
    target = f"{privilege} ({column})" if column else privilege
    expected = before
    for op in OPS:
        if _needs(op, table, privilege, column):
            message = failure_message(result, op)
            assert f"role {role} lacks {target} on public.{table}" in message
            assert f"GRANT {target} ON public.{table} TO {role};" in message
            assert attempts(result, op) == 1
        else:
            assert result.is_node_success(op), op
            expected = getattr(model, op)(expected, T)
    assert pg.snapshot(app_url) == expected
    # The check is honest: without it, PostgreSQL itself refuses the step's statements.
    # UPDATE (id) is what row locks need; the heap walks lock rows (FOR UPDATE SKIP LOCKED)
    # only when a plain batch meets a row the app holds, so hold one to take that path.
    held = _ELIGIBLE_ROW.get(table) if (privilege, column) == ("UPDATE", "id") else None
    engine = pg.engine(pg.as_role(app_url, role))
    try:
        with psycopg.connect(app_url) as app:
            if held is not None:
                app.execute(f"SELECT 1 FROM {table} WHERE id = %s FOR UPDATE", (held,))
            for op in OPS:
                if _needs(op, table, privilege, column):
                    with pytest.raises(sqlalchemy.exc.ProgrammingError) as raised:
                        _call_step(op, engine)
                    assert isinstance(raised.value.orig, psycopg.errors.InsufficientPrivilege)
            app.rollback()
    finally:
        engine.dispose()


# One row of each table that the cleanup deletes at T (see tests/data.py).
_ELIGIBLE_ROW = {
    "after_hours_declines": data.uid(201),
    "device_fingerprints": data.uid(301),
}


def test_missing_temporary_privilege_fails_fast_naming_the_grant(app_url: str, role: str) -> None:
    # PUBLIC has TEMPORARY on every new database by default; an installation may revoke it.
    database = pg.database_name(app_url)
    pg.execute(app_url, f'REVOKE TEMPORARY ON DATABASE "{database}" FROM PUBLIC')
    pg.execute(app_url, f'REVOKE TEMPORARY ON DATABASE "{database}" FROM "{role}"')
    before = pg.snapshot(app_url)
    result = run_job(pg.as_role(app_url, role), partition_key="2026-11-27")
    message = failure_message(result, "remove_orphan_fingerprints")
    assert f"role {role} lacks TEMPORARY on database {database}" in message
    assert f'GRANT TEMPORARY ON DATABASE "{database}" TO {role};' in message
    assert attempts(result, "remove_orphan_fingerprints") == 1
    expected = before
    for op in ("expire_sessions", "purge_declines"):
        assert result.is_node_success(op), op
        expected = getattr(model, op)(expected, T)
    assert pg.snapshot(app_url) == expected
    # The check is honest: without it, PostgreSQL itself refuses the step's temporary table.
    engine = pg.engine(pg.as_role(app_url, role))
    try:
        with pytest.raises(sqlalchemy.exc.ProgrammingError) as raised:
            steps.remove_orphan_fingerprints(engine, T)
        assert isinstance(raised.value.orig, psycopg.errors.InsufficientPrivilege)
    finally:
        engine.dispose()


def test_missing_schema_usage_fails_fast_naming_the_grant(app_url: str, role: str) -> None:
    # PUBLIC has USAGE on schema public by default; an installation may revoke it.
    pg.execute(app_url, "REVOKE USAGE ON SCHEMA public FROM PUBLIC")
    pg.execute(app_url, f'REVOKE USAGE ON SCHEMA public FROM "{role}"')
    before = pg.snapshot(app_url)
    result = run_job(pg.as_role(app_url, role), partition_key="2026-11-27")
    for op in OPS:
        message = failure_message(result, op)
        assert f"role {role} lacks USAGE on schema public" in message
        assert f"GRANT USAGE ON SCHEMA public TO {role};" in message
        assert attempts(result, op) == 1
    assert pg.snapshot(app_url) == before
