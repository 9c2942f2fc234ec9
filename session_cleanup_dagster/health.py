"""Holding batches while the database's streaming replicas fall behind.

A nightly cleanup writes a lot of WAL in minutes. Before a batch, at most every
``CHECK_EVERY_S``, the step reads ``pg_stat_replication`` on the primary: while any connected
replica's replay position (what its readers see) is more than ``max_replica_lag_mb`` behind
the primary's current WAL position, no batch starts. The step logs a line about every 30 s
naming the replica, its lag and the limit, stays cancelable, and resumes by itself once every
replica is within the limit. Past ``max_hold_s`` it fails; committed batches stay, and the
next run continues.

Only connected replicas count. A replication slot with no consumer (an abandoned replica)
has no reader that could see stale data, and holding for it would stop every night's cleanup;
it retains WAL on disk, which is the DBA's alert to watch, not ours.

Seeing other roles' replay positions needs ``pg_read_all_stats`` (part of ``pg_monitor``):
without it the step warns once and goes on unheld (docs/grants.sql).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import psycopg

from session_cleanup_dagster.errors import PermanentDatabaseError
from session_cleanup_dagster.locking import conninfo

CHECK_EVERY_S = 0.5
LOG_EVERY_S = 30.0
POLL_S = 0.25
MB = 1024 * 1024

_LAG_SQL = """
SELECT coalesce(nullif(application_name, ''), host(client_addr), 'pid ' || pid) AS name,
       pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint AS lag
FROM pg_stat_replication
"""


class ReplicaLagTooLong(PermanentDatabaseError):
    """The replicas stayed behind for longer than the step may hold."""


class ReplicaHold:
    """Before each batch: wait while a streaming replica is too far behind."""

    def __init__(
        self,
        url: str,
        step: str,
        *,
        max_lag_mb: int,
        max_hold_s: float,
        connect_timeout_s: int,
        log: Any,
        check_cancel: Callable[[], None],
    ) -> None:
        self._url = url
        self._step = step
        self._limit = max_lag_mb * MB
        self._max_hold_s = max_hold_s
        self._connect_timeout_s = connect_timeout_s
        self._log = log
        self._check_cancel = check_cancel
        self._conn: psycopg.Connection[Any] | None = None
        self._last_check = -CHECK_EVERY_S
        self._enabled = max_lag_mb > 0
        self._privilege_checked = False
        self.held_s = 0.0

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                conninfo(self._url),
                autocommit=True,
                connect_timeout=self._connect_timeout_s,
                prepare_threshold=None,
                application_name="session-cleanup health",
            )
        return self._conn

    def _can_see_lag(self) -> bool:
        row = (
            self._connection()
            .execute("SELECT pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')")
            .fetchone()
        )
        return bool(row and row[0])

    def behind(self) -> list[tuple[str, float]]:
        """Replicas more than the limit behind, as (name, lag in MB)."""
        rows = self._connection().execute(_LAG_SQL).fetchall()
        return [(str(name), lag / MB) for name, lag in rows if lag and lag > self._limit]

    def before_batch(self) -> None:
        """Return at once while healthy; otherwise hold until healthy, canceled or too long.

        Raises:
            ReplicaLagTooLong: still behind after ``max_hold_s``.
            psycopg.Error: the database cannot be reached (transient; the op retries).
        """
        if not self._enabled or time.monotonic() - self._last_check < CHECK_EVERY_S:
            return
        self._last_check = time.monotonic()
        if not self._privilege_checked:
            self._privilege_checked = True
            if not self._can_see_lag():
                self._enabled = False
                self._log.warning(
                    "%s: cannot see the replicas' replay positions (the role lacks "
                    "pg_read_all_stats; GRANT pg_monitor TO it, see docs/grants.sql), so "
                    "batches are not held for replica lag",
                    self._step,
                )
                return
        behind = self.behind()
        if behind:
            self._hold(behind)

    def _hold(self, behind: list[tuple[str, float]]) -> None:
        started = time.monotonic()
        last_log = -LOG_EVERY_S
        try:
            while behind:
                held = time.monotonic() - started
                names = ", ".join(f"{name} {lag:.1f} MB behind" for name, lag in behind)
                limit_mb = self._limit // MB
                if held >= self._max_hold_s:
                    raise ReplicaLagTooLong(
                        f"{self._step}: held {held:.0f} s (app_db.replica_hold_max_s) while "
                        f"replicas stayed more than {limit_mb} MB behind ({names}); stopping. "
                        "Every committed batch is complete and the next run goes on from "
                        "there. Check the replicas, or raise app_db.max_replica_lag_mb."
                    )
                if time.monotonic() - last_log >= LOG_EVERY_S:
                    last_log = time.monotonic()
                    self._log.warning(
                        "%s: holding batches: replica %s (limit %d MB, app_db."
                        "max_replica_lag_mb); held %.0f s of at most %.0f s",
                        self._step,
                        names,
                        limit_mb,
                        held,
                        self._max_hold_s,
                    )
                until = time.monotonic() + CHECK_EVERY_S
                while time.monotonic() < until:
                    self._check_cancel()
                    time.sleep(POLL_S)
                behind = self.behind()
        finally:
            self.held_s += time.monotonic() - started
        self._log.info(
            "%s: replicas within %d MB again; resuming after %.0f s",
            self._step,
            self._limit // MB,
            time.monotonic() - started,
        )

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(psycopg.Error):
                conn.close()
