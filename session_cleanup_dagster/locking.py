"""The overlap guard: one PostgreSQL advisory lock on the app database per cleanup run.

Every run of the job takes a session-level advisory lock with the fixed key
:data:`LOCK_KEY` on the app database, through a connection of its own that lives for the
whole run (it is closed when the run's ``app_db`` resource is torn down, or by the kernel
when the run worker dies). Two cleanups therefore never work at the same time, even from
two Dagster deployments or a manual run outside the queue: the run queue's tag limit keeps
one deployment's runs apart, the lock keeps everything apart.

The lock connection's ``application_name`` is ``session-cleanup run <run id>``. That makes it
the run worker's heartbeat: while the worker lives, ``pg_stat_activity`` shows a connection
with that name; when the worker is gone, so is the connection. ``sensors.py`` uses this to
fail runs that are STARTED but have no worker (Dagster's run monitoring cannot see a dead
worker under the default run launcher).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import sqlalchemy as sa

from session_cleanup_dagster.urls import psycopg_url

# int.from_bytes(b"sesclean", "big") = 8315179157867028846: a fixed bigint, documented in
# docs/operations.md. In pg_locks it shows as locktype 'advisory', classid = high 32 bits
# (1936028515), objid = low 32 bits (1818583406), objsubid 1.
LOCK_KEY = int.from_bytes(b"sesclean", "big")
LOCK_CLASSID = LOCK_KEY >> 32
LOCK_OBJID = LOCK_KEY & 0xFFFFFFFF
RUN_APPLICATION_PREFIX = "session-cleanup run "
POLL_S = 1.0


class LockNotAcquired(Exception):
    """Another cleanup held the lock for longer than this run may wait."""


class LockLost(Exception):
    """The run's lock connection died and another cleanup took the lock meanwhile."""


def conninfo(url: str | sa.URL) -> str:
    """A libpq URL for psycopg.connect (which does not take SQLAlchemy's driver suffix)."""
    return psycopg_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def application_name(run_id: str) -> str:
    """The lock connection's name: 56 characters, under PostgreSQL's limit of 63."""
    return f"{RUN_APPLICATION_PREFIX}{run_id}"


@dataclass(frozen=True)
class Holder:
    """A connection that holds the lock, as pg_stat_activity shows it."""

    pid: int
    application_name: str
    client: str
    backend_start: str

    def describe(self) -> str:
        return (
            f"'{self.application_name}' (server pid {self.pid}, client {self.client}, "
            f"connected since {self.backend_start})"
        )


_HOLDERS_SQL = """
SELECT a.pid, coalesce(a.application_name, ''), coalesce(host(a.client_addr), 'local'),
       a.backend_start::text
  FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted AND l.database = (
         SELECT oid FROM pg_database WHERE datname = current_database())
   AND l.classid = %s AND l.objid = %s AND l.objsubid = 1
"""


def holders(conn: psycopg.Connection[Any]) -> list[Holder]:
    """Who holds the cleanup lock on this database now (at most one connection)."""
    rows = conn.execute(_HOLDERS_SQL, (LOCK_CLASSID, LOCK_OBJID)).fetchall()
    return [Holder(int(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows]


def live_run_ids(url: str, *, connect_timeout_s: int = 10) -> set[str]:
    """Run ids that have a lock connection (holding or waiting) to the app database now.

    Raises:
        psycopg.Error: the database cannot be reached (the caller decides nothing then).
    """
    with psycopg.connect(
        conninfo(url),
        autocommit=True,
        connect_timeout=connect_timeout_s,
        application_name="session-cleanup sensor",
    ) as conn:
        rows = conn.execute(
            "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE %s",
            (RUN_APPLICATION_PREFIX + "%",),
        ).fetchall()
    return {str(r[0])[len(RUN_APPLICATION_PREFIX) :] for r in rows}


class RunLock:
    """The advisory lock of one run, on a dedicated autocommit connection."""

    def __init__(self, url: str, run_id: str, *, connect_timeout_s: int = 10) -> None:
        self.url = url
        self.run_id = run_id
        self.connect_timeout_s = connect_timeout_s
        self._conn: psycopg.Connection[Any] | None = None
        self.held = False

    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self.held = False
            self._conn = psycopg.connect(
                conninfo(self.url),
                autocommit=True,
                connect_timeout=self.connect_timeout_s,
                application_name=application_name(self.run_id),
                # If this worker's host vanishes, the server notices within about a minute
                # and releases the lock; a killed process releases it at once.
                keepalives=1,
                keepalives_idle=20,
                keepalives_interval=10,
                keepalives_count=3,
            )
        return self._conn

    def try_acquire(self) -> bool:
        """Take the lock if it is free; True if this run holds it now."""
        conn = self._connect()
        if not self.held:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()
            self.held = bool(row and row[0])
        return self.held

    def acquire(
        self,
        wait_s: float,
        *,
        on_wait: Callable[[list[Holder], float], None],
        check: Callable[[], None] = lambda: None,
    ) -> None:
        """Take the lock, waiting at most ``wait_s`` seconds for another cleanup to finish.

        Args:
            wait_s: the longest wait.
            on_wait: told who holds the lock and how long we have waited, about every 10 s.
            check: called every second while waiting; raises to stop waiting (a cancel).

        Raises:
            LockNotAcquired: the lock was still held after ``wait_s`` seconds.
            psycopg.Error: the database could not be reached.
        """
        start = time.monotonic()
        last_report = -1e9
        while not self.try_acquire():
            waited = time.monotonic() - start
            assert self._conn is not None
            who = holders(self._conn)
            if waited >= wait_s:
                raise LockNotAcquired(
                    "another session-cleanup run holds the cleanup lock (advisory lock "
                    f"{LOCK_KEY}) on the app database: "
                    + (", ".join(h.describe() for h in who) or "it was released just now")
                    + f". This run waited {waited:.0f} s (app_db.lock_wait_s) and changed "
                    "nothing. Two cleanups never run at once; the other one does the same work. "
                    "If that run is dead, its connection is gone within a minute and the next "
                    "run proceeds."
                )
            if waited - last_report >= 10:
                last_report = waited
                on_wait(who, waited)
            check()
            time.sleep(POLL_S)

    def ensure(self) -> None:
        """Before a batch: make sure the lock is still ours (its connection may have died).

        Raises:
            LockLost: the connection died and another cleanup holds the lock now.
            psycopg.Error: the database cannot be reached (transient; the op retries).
        """
        if self._conn is not None and not self._conn.closed:
            try:
                self._conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                self.close()
        if not self.try_acquire():
            raise LockLost(
                "this run's lock connection to the app database was cut, and another cleanup "
                "took the cleanup lock meanwhile; stopping so two cleanups never overlap. "
                "Every committed batch is complete; the other run does the rest."
            )

    def close(self) -> None:
        """Close the connection: the server releases the lock with it."""
        conn, self._conn, self.held = self._conn, None, False
        if conn is not None:
            # The connection may already be gone; closing is all that is left to do.
            with contextlib.suppress(psycopg.Error):
                conn.close()
