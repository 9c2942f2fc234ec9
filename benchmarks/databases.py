"""Benchmark databases: one seeded template per scale, identical copies per approach."""

from __future__ import annotations

import functools
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import psycopg
import sqlalchemy as sa
from session_cleanup_dev.seed import seed_database

from session_cleanup_dagster.backlog import backlog
from session_cleanup_dagster.contract import GRACE, RETENTION
from session_cleanup_dagster.locking import conninfo
from session_cleanup_dagster.resources import make_engine
from session_cleanup_dagster.urls import psycopg_url

PREFIX = "scbench"
log = logging.getLogger(__name__)


ADMIN_URL_ENV = "SESSION_CLEANUP_BENCH_ADMIN_URL"


# A libpq URL (psycopg.connect does not take SQLAlchemy's driver suffix), as the job makes it.
plain = conninfo


def url_of(admin_url: str, name: str) -> str:
    return conninfo(psycopg_url(admin_url).set(database=name))


def database_of(url: str) -> str:
    return psycopg_url(url).database or ""


@contextmanager
def admin_server(admin_url: str | None) -> Iterator[str]:
    """``admin_url`` if given, else a fresh embedded PostgreSQL 16 for this run alone."""
    if admin_url:
        yield admin_url
        return
    from session_cleanup_dev.embedded import embedded_postgres

    log.info("no --admin-url or $%s: starting an embedded PostgreSQL", ADMIN_URL_ENV)
    with embedded_postgres() as server:
        yield server.admin_url


class Server:
    """Creates and always drops the benchmark's own databases on one server."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = plain(admin_url)
        self.run_id = f"{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.created: list[str] = []

    def _admin(self, sql: str) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(sql)

    def name(self, what: str) -> str:
        return f"{PREFIX}_{self.run_id}_{what}".lower()

    def create(self, what: str, template: str | None = None) -> str:
        name = self.name(what)
        clause = ""
        if template:
            clause = f' TEMPLATE "{template}"'
            if self._version_num >= 150000:
                # PostgreSQL 15's default (WAL_LOG) writes the whole copy through the WAL: 463
                # MB for an S copy, and at L more than max_wal_size, so the checkpoints it
                # forces fell inside the measurement that followed. FILE_COPY copies the files
                # and checkpoints before it returns (2 kB of WAL, and faster).
                clause += " STRATEGY FILE_COPY"
        # Recorded before it exists: a SIGTERM between the CREATE and the record would
        # otherwise leave it behind (drop uses IF EXISTS).
        self.created.append(name)
        self._admin(f'CREATE DATABASE "{name}"{clause}')
        return name

    def drop(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self.created:
            self.created.remove(name)

    def drop_all(self) -> None:
        for name in list(reversed(self.created)):
            self.drop(name)

    @functools.cached_property
    def _version_num(self) -> int:
        with psycopg.connect(self.admin_url) as conn:
            row = conn.execute("SELECT current_setting('server_version_num')::int").fetchone()
            return int(row[0]) if row else 0

    def version(self) -> str:
        with psycopg.connect(self.admin_url) as conn:
            row = conn.execute("SELECT current_setting('server_version')").fetchone()
            return str(row[0]) if row else "?"

    def settings(self) -> dict[str, str]:
        names = ("work_mem", "shared_buffers", "max_wal_size", "maintenance_work_mem")
        with psycopg.connect(self.admin_url) as conn:
            return {n: str(conn.execute(f"SHOW {n}").fetchone()[0]) for n in names}  # type: ignore[index]

    @contextmanager
    def copy(self, template: str, what: str) -> Iterator[str]:
        name = self.create(what, template=template)
        try:
            yield url_of(self.admin_url, name)
        finally:
            self.drop(name)


def seed_template(server: Server, scale: str, users: int, anchor: datetime) -> tuple[str, float]:
    """Seed a template database; VACUUM it, as autovacuum keeps a production table."""
    import time

    name = server.create(f"{scale}_template")
    url = url_of(server.admin_url, name)
    engine = make_engine(url, statement_timeout_ms=3_600_000)
    started = time.monotonic()
    try:
        seed_database(engine, users, anchor=anchor)
    finally:
        engine.dispose()
    # Production tables are vacuumed by autovacuum (visibility map set, hint bits written);
    # a freshly loaded one is not. Every approach starts from the same state.
    vacuum(url, checkpoint=True)
    return name, time.monotonic() - started


def vacuum(url: str, *, checkpoint: bool = False) -> None:
    """``VACUUM (ANALYZE)`` the database, what autovacuum does to a table that changed."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")
        if checkpoint:
            conn.execute("CHECKPOINT")


def expected_state(url: str, cutoff: datetime) -> dict[str, int]:
    """Counts the contract fixes: what each step must change, and what must remain."""
    engine = make_engine(url)
    try:
        due = backlog(engine, cutoff)
        with engine.connect() as conn:
            kept = _kept(conn, cutoff)
    finally:
        engine.dispose()
    return {**{f"due_{k}": v for k, v in due.items()}, **kept}


def _kept(conn: sa.Connection, cutoff: datetime) -> dict[str, int]:
    """Rows no step may remove or end (the app's load only adds to these)."""
    params = {
        "t": cutoff,
        "retention": cutoff - RETENTION,
        "grace": cutoff - GRACE,
    }
    queries = {
        "users": "SELECT count(*) FROM users",
        "sessions": "SELECT count(*) FROM after_hours_sessions",
        "open_not_expired": (
            "SELECT count(*) FROM after_hours_sessions WHERE ended_at IS NULL AND expires_at >= :t"
        ),
        "recent_declines": (
            "SELECT count(*) FROM after_hours_declines WHERE created_at >= :retention"
        ),
        "kept_fingerprints": (
            "SELECT count(*) FROM device_fingerprints f WHERE session_id IS NULL"
            " OR created_at >= :grace"
            " OR EXISTS (SELECT 1 FROM after_hours_sessions s WHERE s.id = f.session_id)"
        ),
    }
    return {k: int(conn.execute(sa.text(q), params).scalar_one()) for k, q in queries.items()}


def verify(
    url: str, cutoff: datetime, before: dict[str, int], app_writes: int, unfinished: list[str]
) -> dict[str, object]:
    """The end state against the contract.

    No due row remains, except rows the app held locked while a step passed (skipped and left
    for the next run: at most one per app write during the run); every row the contract keeps
    is still there. A step that did not finish (the old worker's guard) is not checked for
    its due rows, only for what it must keep.
    """
    after = expected_state(url, cutoff)
    problems = []
    left = {k: v for k, v in after.items() if k.startswith("due_") and k[4:] not in unfinished}
    if sum(left.values()) > app_writes:
        problems.append(f"due rows remain: {left}")
    for key in ("users", "sessions", "open_not_expired", "recent_declines", "kept_fingerprints"):
        if after[key] < before[key]:
            problems.append(f"{key}: {before[key]} before, {after[key]} after")
    return {"ok": not problems, "problems": problems, "left_for_next_run": left, "after": after}
