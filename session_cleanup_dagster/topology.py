"""Where APP_DATABASE_URL leads: a primary, not a standby, and not a transaction-pooling pooler.

Checked at the start of every op attempt, before the lock and before any row changes, with two
short-lived connections:

- ``pg_is_in_recovery()``: a standby cannot be cleaned. On a first attempt that is a wrong
  URL (permanent); on a retry it is a failover in progress, so it stays transient.
- Transaction pooling (PgBouncer ``pool_mode = transaction``, RDS Proxy, Supavisor) hands
  each transaction any server connection, so the run's session lock and session limits would
  land on connections it does not own. Two client connections show it: while B holds a
  transaction open, A's next statement must still run on A's own backend, and B must not have
  been given A's backend. A pooler that reuses the idle backend (PgBouncer's default, LIFO)
  fails one of the two. A direct connection or session pooling passes both.
"""

from __future__ import annotations

from typing import Any

import psycopg

from session_cleanup_dagster.errors import PermanentDatabaseError, TransientDatabaseError
from session_cleanup_dagster.locking import conninfo


def _connect(url: str, connect_timeout_s: int, autocommit: bool) -> psycopg.Connection[Any]:
    return psycopg.connect(
        conninfo(url),
        autocommit=autocommit,
        connect_timeout=connect_timeout_s,
        prepare_threshold=None,
        application_name="session-cleanup probe",
    )


def _pid(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def check(url: str, step: str, *, connect_timeout_s: int, retrying: bool) -> None:
    """Raise unless ``url`` leads to a primary through a direct or session-pooled connection.

    Raises:
        PermanentDatabaseError: a standby (first attempt), or transaction pooling.
        TransientDatabaseError: a standby on a retry (a failover in progress).
        psycopg.Error: the database cannot be reached.
    """
    with _connect(url, connect_timeout_s, autocommit=True) as first:
        row = first.execute("SELECT pg_is_in_recovery()").fetchone()
        if row is not None and row[0]:
            if retrying:
                raise TransientDatabaseError(
                    f"{step}: the app database is a standby now (pg_is_in_recovery()), as "
                    "during a failover; retrying until APP_DATABASE_URL leads to the new primary."
                )
            raise PermanentDatabaseError(
                f"{step}: APP_DATABASE_URL leads to a read-only standby (pg_is_in_recovery() is "
                "true), and a cleanup must write. Point APP_DATABASE_URL at the primary, or at a "
                "host name that follows it across failover. Nothing was changed."
            )
        own = _pid(first)
        with _connect(url, connect_timeout_s, autocommit=False) as second:
            other = _pid(second)  # opens a transaction and keeps it open
            again = _pid(first)
            second.rollback()
    if other == own or again != own:
        raise PermanentDatabaseError(
            f"{step}: APP_DATABASE_URL goes through a pooler in transaction pooling mode (one "
            "client connection was served by different server connections). The job keeps "
            "session state (its cleanup lock and its session limits), which transaction "
            "pooling hands to other clients. Use a session-pooling pool (PgBouncer pool_mode = "
            "session) or connect to PostgreSQL directly. Nothing was changed."
        )
