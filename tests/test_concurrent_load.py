"""The job under concurrent app load on a database of at least 1M rows.

Touches: the whole job through execute_in_process, on a fresh database seeded with
session_cleanup_dev.seed (80,000 users: 1,000,000 rows over the four tables; set
SESSION_CLEANUP_LOAD_USERS for more), while a bounded load generator acts like the app from
several threads, each with its own psycopg connection and one transaction per operation:

- opens sessions for its own users and ends them again;
- upserts declines with INSERT ... ON CONFLICT (user_id, declined_user_id) DO UPDATE, many on
  pairs whose old decline the cleanup is deleting at the same moment;
- inserts fingerprints whose session commits later than the fingerprint (the fingerprint is
  committed first, the session a few milliseconds after), some created exactly at the grace
  boundary;
- deletes sessions, which cascades to their declines (and orphans their fingerprints).

Every app write is recorded, so afterwards the database can be judged row by row (in SQL,
against a copy of the four tables taken before): the app saw no error and the server counted
no deadlock; every seed row either changed as the contract says, or is still eligible (left
for the next run), or was changed by the app; no other row changed; no app row was touched
by the cleanup, in particular no fingerprint whose session committed inside the grace
period. A second, quiet run then finishes exactly what was left. The app's p50/p99 latency
while idle and during the cleanup is printed, never asserted.
"""

from __future__ import annotations

import os
import queue
import random
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from session_cleanup_dev.seed import seed_database

from session_cleanup_dagster import backlog
from tests import pg
from tests.jobrun import OPS, attempts, output_metadata, run_job

USERS = int(os.environ.get("SESSION_CLEANUP_LOAD_USERS", "80000"))  # 12.5 rows per user
THREADS = int(os.environ.get("SESSION_CLEANUP_LOAD_THREADS", "4"))
IDLE_S = 3.0
MAX_CLEANUP_S = 420.0  # the load stops after this even if the job has not finished
RETENTION = timedelta(days=7)
GRACE = timedelta(hours=1)
TABLES = {
    "s": "after_hours_sessions",
    "d": "after_hours_declines",
    "f": "device_fingerprints",
    "u": "users",
}


@dataclass
class AppLog:
    """What the app did, so its writes can be told apart from the cleanup's."""

    sessions: dict[uuid.UUID, bool] = field(default_factory=dict)  # id -> ended by the app
    deleted: list[uuid.UUID] = field(default_factory=list)
    pairs: set[tuple[str, str]] = field(default_factory=set)
    fingerprints: list[uuid.UUID] = field(default_factory=list)
    latencies: list[tuple[str, str, float]] = field(default_factory=list)  # phase, op, s
    errors: list[str] = field(default_factory=list)
    ops: int = 0


class App(threading.Thread):
    """One app connection doing a fixed mix of operations until told to stop."""

    def __init__(
        self,
        index: int,
        url: str,
        cutoff: datetime,
        victims: queue.Queue[uuid.UUID],
        upserts: list[tuple[str, str, uuid.UUID]],
        phase: list[str],
        stop: threading.Event,
    ) -> None:
        super().__init__(name=f"app-{index}", daemon=True)
        self.url = url
        self.cutoff = cutoff
        self.victims = victims
        self.upserts = upserts
        self.phase = phase
        self.stop = stop
        self.log = AppLog()
        self.users = [f"load_u{index}_{k}" for k in range(20)]
        self.open: dict[str, uuid.UUID] = {}
        self.random = random.Random(index)

    def run(self) -> None:
        mix: list[Callable[[psycopg.Connection[Any]], str]] = [
            self.open_or_end_session,
            self.upsert_decline,
            self.fingerprint_before_session,
            self.upsert_decline,
            self.delete_session,
            self.open_or_end_session,
            self.fingerprint_before_session,
        ]
        try:
            with psycopg.connect(self.url, options="-c statement_timeout=60000") as conn:
                step = 0
                while not self.stop.is_set() and self.log.ops < 200_000:
                    operation = mix[step % len(mix)]
                    step += 1
                    phase = self.phase[0]
                    started = time.perf_counter()
                    try:
                        name = operation(conn)
                    except Exception as exc:
                        conn.rollback()
                        self.log.errors.append(f"{operation.__name__}: {exc!r}")
                        continue
                    self.log.latencies.append((phase, name, time.perf_counter() - started))
                    self.log.ops += 1
                    time.sleep(0.002)
        except Exception as exc:
            self.log.errors.append(f"connection: {exc!r}")

    def open_or_end_session(self, conn: psycopg.Connection[Any]) -> str:
        user = self.random.choice(self.users)
        if user in self.open:
            session = self.open.pop(user)
            with conn.transaction():
                conn.execute(
                    "UPDATE after_hours_sessions SET ended_at = now() WHERE id = %s", (session,)
                )
            self.log.sessions[session] = True
            return "end_session"
        session = uuid.uuid4()
        with conn.transaction():
            conn.execute(
                "INSERT INTO after_hours_sessions (id, user_id, expires_at, latitude, longitude,"
                " fuzzed_latitude, fuzzed_longitude) VALUES (%s, %s, now() + interval '2 hours',"
                " 52.52, 13.40, 52.53, 13.41)",
                (session, user),
            )
        self.open[user] = session
        self.log.sessions[session] = False
        return "open_session"

    def upsert_decline(self, conn: psycopg.Connection[Any]) -> str:
        user, declined, session = self.random.choice(self.upserts)
        with conn.transaction():
            conn.execute(
                "INSERT INTO after_hours_declines AS d (id, session_id, user_id, declined_user_id,"
                " created_at, decline_count, first_declined_at, last_session_id)"
                " VALUES (%s, %s, %s, %s, now(), 1, now(), %s)"
                " ON CONFLICT (user_id, declined_user_id) DO UPDATE SET"
                " decline_count = d.decline_count + 1, created_at = EXCLUDED.created_at,"
                " last_session_id = EXCLUDED.last_session_id",
                (uuid.uuid4(), session, user, declined, session),
            )
        self.log.pairs.add((user, declined))
        return "upsert_decline"

    def fingerprint_before_session(self, conn: psycopg.Connection[Any]) -> str:
        session, fingerprint = uuid.uuid4(), uuid.uuid4()
        user = self.random.choice(self.users)
        # Half of them exactly one second inside the grace period of this run's cutoff.
        created = self.cutoff - GRACE + timedelta(seconds=1) if self.random.random() < 0.5 else None
        with conn.transaction():
            conn.execute(
                "INSERT INTO device_fingerprints (id, user_id, session_id, fingerprint_hash,"
                " created_at) VALUES (%s, %s, %s, %s, coalesce(%s, now()))",
                (fingerprint, user, session, f"load-{fingerprint}", created),
            )
        self.log.fingerprints.append(fingerprint)
        time.sleep(self.random.uniform(0.001, 0.02))  # the session commits later
        with conn.transaction():
            conn.execute(
                "INSERT INTO after_hours_sessions (id, user_id, expires_at, ended_at, latitude,"
                " longitude, fuzzed_latitude, fuzzed_longitude) VALUES (%s, %s,"
                " now() + interval '2 hours', now(), 52.52, 13.40, 52.53, 13.41)",
                (session, user),
            )
        self.log.sessions[session] = True
        return "fingerprint_then_session"

    def delete_session(self, conn: psycopg.Connection[Any]) -> str:
        try:
            victim = self.victims.get_nowait()
        except queue.Empty:
            return "delete_session_none_left"
        with conn.transaction():
            conn.execute("DELETE FROM after_hours_sessions WHERE id = %s", (victim,))
        self.log.deleted.append(victim)
        return "delete_session"


def _percentiles(values: list[float]) -> str:
    if len(values) < 2:
        return "n/a"
    cuts = statistics.quantiles(values, n=100)
    return f"p50 {cuts[49] * 1000:.1f} ms, p99 {cuts[98] * 1000:.1f} ms ({len(values)} ops)"


# Each check returns the rows that break the contract (at most 5 shown); all must be empty.
CHECKS = {
    "seed session gone, not deleted by the app": """
        SELECT b.id FROM v.s b LEFT JOIN after_hours_sessions a USING (id)
        WHERE a.id IS NULL AND NOT EXISTS (SELECT FROM app_deleted x WHERE x.id = b.id)""",
    "seed session changed other than ended_at = expires_at of an expired open one": """
        SELECT b.id FROM v.s b JOIN after_hours_sessions a USING (id)
        WHERE to_jsonb(a) <> to_jsonb(b) AND NOT (
            b.ended_at IS NULL AND b.expires_at < %(t)s
            AND to_jsonb(a)
                = to_jsonb(b) || jsonb_build_object('ended_at', to_jsonb(b.expires_at)))""",
    "session that neither the seed nor the app made": """
        SELECT a.id FROM after_hours_sessions a
        WHERE NOT EXISTS (SELECT FROM v.s x WHERE x.id = a.id)
          AND NOT EXISTS (SELECT FROM app_sessions x WHERE x.id = a.id)""",
    "app session missing, or its ended_at not the app's": """
        SELECT p.id FROM app_sessions p LEFT JOIN after_hours_sessions a USING (id)
        WHERE a.id IS NULL OR (p.ended AND (a.ended_at IS NULL OR a.ended_at = a.expires_at))
           OR (NOT p.ended AND a.ended_at IS NOT NULL)""",
    "seed decline gone, neither due nor cascaded from an app delete": """
        SELECT b.id FROM v.d b LEFT JOIN after_hours_declines a USING (id)
        WHERE a.id IS NULL AND NOT (b.created_at < %(t)s - %(retention)s)
          AND NOT EXISTS (SELECT FROM app_deleted x WHERE x.id = b.session_id)""",
    "seed decline changed, not by an app upsert": """
        SELECT b.id FROM v.d b JOIN after_hours_declines a USING (id)
        WHERE to_jsonb(a) <> to_jsonb(b)
          AND (b.user_id, b.declined_user_id) NOT IN (SELECT user_id, declined FROM app_pairs)""",
    "decline that neither the seed nor an app upsert made": """
        SELECT a.id FROM after_hours_declines a
        WHERE NOT EXISTS (SELECT FROM v.d x WHERE x.id = a.id)
          AND (a.user_id, a.declined_user_id) NOT IN (SELECT user_id, declined FROM app_pairs)""",
    "decline the app upserted is gone or was not the app's last write": """
        SELECT p.user_id, p.declined FROM app_pairs p
        LEFT JOIN after_hours_declines a
          ON a.user_id = p.user_id AND a.declined_user_id = p.declined
        WHERE a.id IS NULL OR a.created_at < %(load_start)s""",
    "seed fingerprint gone, not an orphan older than the grace period": """
        SELECT b.id FROM v.f b LEFT JOIN device_fingerprints a USING (id)
        WHERE a.id IS NULL AND NOT (
            b.session_id IS NOT NULL AND b.created_at < %(t)s - %(grace)s
            AND (NOT EXISTS (SELECT FROM v.s x WHERE x.id = b.session_id)
                 OR EXISTS (SELECT FROM app_deleted x WHERE x.id = b.session_id)))""",
    "seed fingerprint changed": """
        SELECT b.id FROM v.f b JOIN device_fingerprints a USING (id)
        WHERE to_jsonb(a) <> to_jsonb(b)""",
    "fingerprint that neither the seed nor the app made": """
        SELECT a.id FROM device_fingerprints a
        WHERE NOT EXISTS (SELECT FROM v.f x WHERE x.id = a.id)
          AND NOT EXISTS (SELECT FROM app_fingerprints x WHERE x.id = a.id)""",
    "app fingerprint (session committed later, inside the grace period) deleted": """
        SELECT p.id FROM app_fingerprints p LEFT JOIN device_fingerprints a USING (id)
        WHERE a.id IS NULL""",
    "seed user changed or gone": """
        SELECT b.id FROM v.u b LEFT JOIN users a USING (id)
        WHERE a.id IS NULL OR to_jsonb(a) <> to_jsonb(b)""",
}


def _record_app_log(conn: psycopg.Connection[Any], log: AppLog) -> None:
    conn.execute("CREATE TEMP TABLE app_deleted (id uuid PRIMARY KEY)")
    conn.execute("CREATE TEMP TABLE app_sessions (id uuid PRIMARY KEY, ended boolean)")
    conn.execute("CREATE TEMP TABLE app_pairs (user_id text, declined text)")
    conn.execute("CREATE TEMP TABLE app_fingerprints (id uuid PRIMARY KEY)")
    with conn.cursor() as cur:
        with cur.copy("COPY app_deleted FROM STDIN") as copy:
            for session in log.deleted:
                copy.write_row((session,))
        with cur.copy("COPY app_sessions FROM STDIN") as copy:
            for session, ended in log.sessions.items():
                copy.write_row((session, ended))
        with cur.copy("COPY app_pairs FROM STDIN") as copy:
            for pair in log.pairs:
                copy.write_row(pair)
        with cur.copy("COPY app_fingerprints FROM STDIN") as copy:
            for fingerprint in log.fingerprints:
                copy.write_row((fingerprint,))
    conn.execute("ANALYZE app_deleted, app_sessions, app_pairs, app_fingerprints")


@pytest.mark.slow
def test_cleanup_under_app_load_changes_exactly_the_contracts_rows(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cutoff = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=2)
    engine = pg.engine(database_url)
    try:
        counts = seed_database(engine, USERS, anchor=cutoff)
    finally:
        engine.dispose()
    assert sum(counts.values()) >= 1_000_000 or USERS < 80_000

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA v")
        for short, table in TABLES.items():
            conn.execute(f"CREATE TABLE v.{short} AS TABLE {table}".encode())
        conn.execute("ALTER TABLE v.s ADD PRIMARY KEY (id)")
        conn.execute("ALTER TABLE v.d ADD PRIMARY KEY (id)")
        conn.execute("ALTER TABLE v.f ADD PRIMARY KEY (id)")
        conn.execute("ANALYZE v.s, v.d, v.f, v.u")
        conn.execute(
            "INSERT INTO users (id, created_at) SELECT 'load_u' || t || '_' || k, now()"
            " FROM generate_series(0, %s) t, generate_series(0, 19) k",
            (THREADS - 1,),
        )
        # Sessions the app will delete: all five of every 40th user's (their declines cascade).
        victims: queue.Queue[uuid.UUID] = queue.Queue()
        for (session,) in conn.execute(
            "SELECT id FROM v.s WHERE substr(user_id, 6)::int % 40 = 7 ORDER BY random()"
        ):
            victims.put(session)
        # Pairs the app will upsert: the existing declines of another 40th (mostly old, so
        # the cleanup is deleting them at the same time), against one of the user's sessions.
        upserts = [
            (user, declined, session)
            for user, declined, session in conn.execute(
                "SELECT user_id, declined_user_id, session_id FROM v.d"
                " WHERE substr(user_id, 6)::int % 40 = 13"
            )
        ]
        deadlocks_before = conn.execute(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()

    phase = ["idle"]
    stop = threading.Event()
    load_start = datetime.now(UTC)
    apps = [App(i, database_url, cutoff, victims, upserts, phase, stop) for i in range(THREADS)]
    try:
        for app in apps:
            app.start()
        time.sleep(IDLE_S)
        phase[0] = "cleanup"
        watchdog = threading.Timer(MAX_CLEANUP_S, stop.set)
        watchdog.start()
        started = time.perf_counter()
        result = run_job(database_url, op_config={op: {"as_of": cutoff.isoformat()} for op in OPS})
        cleanup_s = time.perf_counter() - started
        watchdog.cancel()
        phase[0] = "after"
        time.sleep(0.5)
    finally:
        stop.set()
        for app in apps:
            app.join(timeout=120)
    assert result.success
    # No op needed a retry: no deadlock, lock timeout or serialization failure on our side.
    assert {op: attempts(result, op) for op in OPS} == dict.fromkeys(OPS, 1)
    assert not any(app.is_alive() for app in apps)

    log = AppLog()
    for app in apps:
        log.sessions.update(app.log.sessions)
        log.deleted.extend(app.log.deleted)
        log.pairs |= app.log.pairs
        log.fingerprints.extend(app.log.fingerprints)
        log.latencies.extend(app.log.latencies)
        log.errors.extend(app.log.errors)
        log.ops += app.log.ops
    assert log.errors == []
    changed = {op: output_metadata(result, op)["rows_changed"] for op in OPS}

    with psycopg.connect(database_url, autocommit=True) as conn:
        deadlocks_after = conn.execute(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
        assert deadlocks_after == deadlocks_before
        _record_app_log(conn, log)
        params = {"t": cutoff, "retention": RETENTION, "grace": GRACE, "load_start": load_start}
        broken = {}
        for name, sql in CHECKS.items():
            rows = conn.execute(f"{sql} LIMIT 5".encode(), params).fetchall()
            if rows:
                broken[name] = rows
    assert broken == {}

    # What the run left (rows the app held locked, orphans its deletes made after the walk
    # passed) is still eligible; a quiet second run changes exactly that, and then nothing is.
    engine = pg.engine(database_url)
    try:
        left = backlog.backlog(engine, cutoff)
        again = run_job(database_url, op_config={op: {"as_of": cutoff.isoformat()} for op in OPS})
        assert again.success
        assert {op: output_metadata(again, op)["rows_changed"] for op in OPS} == left
        assert backlog.backlog(engine, cutoff) == dict.fromkeys(OPS, 0)
    finally:
        engine.dispose()

    idle = [s for p, _, s in log.latencies if p == "idle"]
    during = [s for p, _, s in log.latencies if p == "cleanup"]
    with capsys.disabled():
        print(
            f"\nconcurrent load: {sum(counts.values()):,} rows seeded ({counts}), "
            f"{THREADS} app threads, {log.ops:,} app operations, 0 errors, 0 deadlocks\n"
            f"  cleanup took {cleanup_s:.1f} s, changed {changed}; left for the next run {left}\n"
            f"  app writes: {len(log.sessions):,} sessions, {len(log.deleted):,} deleted,"
            f" {len(log.pairs):,} decline pairs upserted, {len(log.fingerprints):,}"
            " fingerprints committed before their session\n"
            f"  app latency idle:           {_percentiles(idle)}\n"
            f"  app latency during cleanup: {_percentiles(during)}"
        )
