"""Real PostgreSQL for tests: the suite's server, scratch databases, URLs, table snapshots.

The suite's server is the one ``SESSION_CLEANUP_TEST_ADMIN_URL`` names, else an embedded
PostgreSQL 16 (pgserver) that the suite starts and stops itself. URLs are composed with
SQLAlchemy's ``URL`` (never by string surgery), so a socket URL such as
``postgresql://postgres@/postgres?host=/tmp/...&port=N`` works exactly like a TCP one.
"""

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
from session_cleanup_dagster.locking import conninfo
from session_cleanup_dagster.resources import make_engine
from session_cleanup_dagster.urls import psycopg_url

ADMIN_URL_ENV = "SESSION_CLEANUP_TEST_ADMIN_URL"
TABLES = ("users", "after_hours_sessions", "after_hours_declines", "device_fingerprints")


@contextmanager
def server() -> Iterator[str]:
    """The suite's server: ``$SESSION_CLEANUP_TEST_ADMIN_URL``, else a fresh embedded one.

    Never a server that merely happens to answer on a well-known port: the suite must prove
    the same thing on a user's fresh machine as on a developer's.
    """
    configured = os.environ.get(ADMIN_URL_ENV)
    if configured:
        yield _plain(configured)
        return
    from session_cleanup_dev.embedded import embedded_postgres

    with embedded_postgres() as embedded:
        throwaway(embedded.admin_url)
        yield embedded.admin_url


def throwaway(admin_url: str) -> None:
    """Tune a server whose data is thrown away after the suite: no waiting on the disk.

    fsync, full-page writes and synchronous commit only matter when the machine itself
    crashes; a killed postmaster or backend loses nothing without them, since every write
    still reaches the kernel. CREATE DATABASE, DROP DATABASE and every commit stop waiting on
    a flush, which on a slow disk took most of some tests' time.
    """
    with psycopg.connect(_plain(admin_url), autocommit=True) as conn:
        for setting in ("fsync", "full_page_writes", "synchronous_commit"):
            conn.execute(f"ALTER SYSTEM SET {setting} = off")
        conn.execute("SELECT pg_reload_conf()")


# A libpq URL (psycopg.connect does not take SQLAlchemy's driver suffix), as the job makes it.
_plain = conninfo


def database_url(admin_url: str, name: str) -> str:
    """The URL of database ``name`` on the same server as ``admin_url``."""
    return conninfo(psycopg_url(admin_url).set(database=name))


def database_name(url: str) -> str:
    """The database that ``url`` names."""
    name = psycopg_url(url).database
    assert name, f"no database in {url!r}"
    return name


def as_role(url: str, role: str, password: str | None = None) -> str:
    """``url`` with its user replaced by ``role`` (and its password by ``password``)."""
    return conninfo(psycopg_url(url).set(username=role, password=password))


def with_query(url: str, **params: str) -> str:
    """``url`` with libpq parameters added to its query (``?password=...`` and the like)."""
    return conninfo(psycopg_url(url).update_query_dict(params))


@contextmanager
def scratch_database(admin_url: str) -> Iterator[str]:
    """Create a uniquely named database; drop it (forcibly) on exit."""
    name = f"sct_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_plain(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield database_url(admin_url, name)
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


def row_with_id(state: Snapshot, row_id: Any) -> list[dict[str, Any]]:
    """The row (in any table) whose id is ``row_id``, as a list: empty if there is none."""
    return [row for rows in state.values() for row in rows if row["id"] == row_id]


def without_row(state: Snapshot, row_id: Any) -> Snapshot:
    """The state without the row whose id is ``row_id``."""
    return {table: [row for row in rows if row["id"] != row_id] for table, rows in state.items()}


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

    def url(self, role: str, password: str | None, database: str = "postgres") -> str:
        """``postgresql://role:password@/database?host=<socket dir>&port=N``."""
        return as_role(database_url(self.admin_url, database), role, password)

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
    from session_cleanup_dev.embedded import embedded_postgres

    with embedded_postgres() as server:
        (server.data_dir / "pg_hba.conf").write_text(
            "local all postgres trust\nlocal all all scram-sha-256\n"
        )
        execute(server.admin_url, "SELECT pg_reload_conf()")
        yield PasswordServer(admin_url=server.admin_url, log_path=server.data_dir / "log")
