"""Real PostgreSQL for tests: finding a server, scratch databases, whole-table snapshots."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa

from session_cleanup_dagster import schema
from session_cleanup_dagster.resources import make_engine
from session_cleanup_dagster.urls import psycopg_url

LOCAL_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TABLES = ("users", "after_hours_sessions", "after_hours_declines", "device_fingerprints")


@contextmanager
def server() -> Iterator[str]:
    """The admin URL of a reachable server, starting an embedded one if none answers."""
    configured = os.environ.get("SESSION_CLEANUP_TEST_ADMIN_URL")
    if configured:
        yield configured
        return
    # Imported here: pgserver is only needed (and only imported) on a machine with no server.
    from session_cleanup_dagster.embedded import embedded_postgres, server_answers

    if server_answers(LOCAL_ADMIN_URL):
        yield LOCAL_ADMIN_URL
    else:
        with embedded_postgres() as embedded:
            yield embedded.admin_url


def database_url(admin_url: str, name: str) -> str:
    """The URL of database ``name`` on the same server as ``admin_url``."""
    return psycopg_url(admin_url).set(database=name).render_as_string(hide_password=False)


def _plain(url: str) -> str:
    """A libpq URL (psycopg.connect does not take SQLAlchemy's driver suffix)."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@contextmanager
def scratch_database(admin_url: str) -> Iterator[str]:
    """Create a uniquely named database; drop it (forcibly) on exit."""
    name = f"sct_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_plain(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _plain(database_url(admin_url, name))
    finally:
        with psycopg.connect(_plain(admin_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def engine(url: str) -> sa.Engine:
    """An engine like the job's own (psycopg 3, our session limits)."""
    return make_engine(url)


def create_schema(url: str, schema_name: str = "public") -> None:
    """Create the app's reference schema, empty."""
    eng = engine(url)
    try:
        with eng.begin() as conn:
            schema.create_reference_schema(conn, schema_name)
    finally:
        eng.dispose()


Snapshot = dict[str, list[dict[str, Any]]]


def snapshot(url: str, schema_name: str = "public") -> Snapshot:
    """Every row of the four tables, every column, ordered by id: the whole state."""
    with psycopg.connect(_plain(url)) as conn:
        return snapshot_on(conn, schema_name)


def snapshot_on(conn: psycopg.Connection[Any], schema_name: str = "public") -> Snapshot:
    """:func:`snapshot` over an open connection (saves a connection per call in loops)."""
    state: Snapshot = {}
    for table in TABLES:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        rows = cur.execute(f'SELECT * FROM "{schema_name}"."{table}" ORDER BY id').fetchall()
        state[table] = rows
    return state


def execute(url: str, sql: str, params: Any = None) -> None:
    """Run one statement in its own committed transaction."""
    with psycopg.connect(_plain(url), autocommit=True) as conn:
        conn.execute(sql, params)


@dataclass(frozen=True)
class PasswordServer:
    """An embedded PostgreSQL where every role but ``postgres`` must give its password."""

    admin_url: str
    log_path: Path

    def create_role(self, role: str, password: str, *, superuser: bool = False) -> None:
        kind = "SUPERUSER" if superuser else ""
        execute(self.admin_url, f"CREATE ROLE \"{role}\" LOGIN {kind} PASSWORD '{password}'")

    def url(self, role: str, password: str, database: str = "postgres") -> str:
        """``postgresql://role:password@/database?host=<socket dir>&port=N``."""
        parsed = psycopg_url(self.admin_url).set(
            username=role, password=password, database=database
        )
        return _plain(parsed.render_as_string(hide_password=False))

    def auth_failures(self, role: str) -> int:
        """How many times the server refused ``role``'s password (from its log)."""
        needle = f'password authentication failed for user "{role}"'
        return self.log_path.read_text(errors="replace").count(needle)


@contextmanager
def password_server() -> Iterator[PasswordServer]:
    """A private embedded server with password (SCRAM) authentication for all but postgres.

    The shared test server trusts every local connection, so a wrong password would go
    unnoticed there. This one is ours alone, so changing its pg_hba.conf is fine.
    """
    from session_cleanup_dagster.embedded import embedded_postgres

    with embedded_postgres() as server:
        (server.data_dir / "pg_hba.conf").write_text(
            "local all postgres trust\nlocal all all scram-sha-256\n"
        )
        execute(server.admin_url, "SELECT pg_reload_conf()")
        yield PasswordServer(admin_url=server.admin_url, log_path=server.data_dir / "log")
