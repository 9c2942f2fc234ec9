"""``python -m benchmarks.replica``: the steps beside a streaming replica, held and unheld.

On a primary and a hot standby of it (tests/topology.py: the embedded PostgreSQL 16 and a
``pg_basebackup -R`` copy, streaming over unix sockets on this machine), it seeds one template,
then runs the three step functions (the job's order) on a fresh copy once per ``--limits``
value: ``0`` runs unheld, any other value holds batches while the standby replays more than
that many MB behind (health.py, as the ops do). Per step it prints the WAL written, the
standby's largest replay lag (sampled every 50 ms from pg_stat_replication) and the wall time.
``--slow-replay-ms`` pauses the standby's replay for that long every second, a replica that
cannot keep up (a busy or distant one), so the hold has something to do. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from typing import Any

import psycopg
from session_cleanup_dev.seed import parse_scale

from benchmarks import databases
from benchmarks.__main__ import _exit_on_sigterm
from benchmarks.approaches import JOB_ORDER
from benchmarks.runner import CUTOFF
from session_cleanup_dagster import health, steps
from session_cleanup_dagster.resources import make_engine
from tests import topology

MB = 1024 * 1024


class LagSampler:
    """The standby's replay lag behind the primary, sampled in a thread; max since reset."""

    def __init__(self, primary_url: str, every_s: float = 0.05) -> None:
        self.primary_url = primary_url
        self.every_s = every_s
        self.max_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.primary_url, autocommit=True) as conn:
            while not self._stop.is_set():
                row = conn.execute(
                    "SELECT max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn))::bigint"
                    " FROM pg_stat_replication"
                ).fetchone()
                if row and row[0]:
                    self.max_bytes = max(self.max_bytes, int(row[0]))
                time.sleep(self.every_s)

    def __enter__(self) -> LagSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


class SlowReplay:
    """Pause the standby's replay ``pause_ms`` out of every second (0: never)."""

    def __init__(self, standby_url: str, pause_ms: int) -> None:
        self.standby_url = standby_url
        self.pause_s = pause_ms / 1000
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.standby_url, autocommit=True) as conn:
            while not self._stop.is_set():
                conn.execute("SELECT pg_wal_replay_pause()")
                self._stop.wait(self.pause_s)
                conn.execute("SELECT pg_wal_replay_resume()")
                self._stop.wait(max(0.0, 1.0 - self.pause_s))

    def __enter__(self) -> SlowReplay:
        if self.pause_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)


class _Log:
    def warning(self, msg: str, *args: Any) -> None:
        pass

    info = warning


def _wal_lsn(url: str) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def _wal_bytes(url: str, since: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (since,)).fetchone()
    assert row is not None
    return int(row[0])


def _hook(hold: health.ReplicaHold) -> steps.BeforeBatch:
    return lambda _: hold.before_batch()


def run_once(
    pair: topology.ReplicaPair, url: str, limit_mb: int, slow_ms: int
) -> list[dict[str, Any]]:
    engine = make_engine(url)
    figures = []
    try:
        for name in JOB_ORDER:
            pair.wait_caught_up(within_bytes=MB)
            hold = health.ReplicaHold(
                url,
                name,
                max_lag_mb=limit_mb,
                max_hold_s=3600,
                connect_timeout_s=10,
                log=_Log(),
                check_cancel=lambda: None,
            )
            start_lsn = _wal_lsn(url)
            started = time.monotonic()
            with LagSampler(pair.primary_url) as lag, SlowReplay(pair.standby_url, slow_ms):
                result = getattr(steps, name)(
                    engine, CUTOFF, steps.StepOptions(), before_batch=_hook(hold)
                )
            hold.close()
            figures.append(
                {
                    "step": name,
                    "rows": result.changed,
                    "wal_mb": _wal_bytes(url, start_lsn) / MB,
                    "max_lag_mb": lag.max_bytes / MB,
                    "wall_s": time.monotonic() - started,
                    "held_s": hold.held_s,
                }
            )
    finally:
        engine.dispose()
    return figures


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.replica", description=__doc__)
    parser.add_argument("--scale", default="S")
    parser.add_argument("--limits", default="0,100,16", help="max_replica_lag_mb values; 0: off")
    parser.add_argument("--slow-replay-ms", type=int, default=0)
    args = parser.parse_args(argv)
    users = parse_scale(args.scale)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with topology.replica_pair() as pair:
        server = databases.Server(pair.primary_url)
        try:
            template, seed_s = databases.seed_template(server, "replica", users, CUTOFF)
            print(f"scale {args.scale}: {users} users seeded in {seed_s:.0f} s", flush=True)
            for limit in (int(x) for x in args.limits.split(",")):
                with server.copy(template, f"limit{limit}") as url:
                    figures = run_once(pair, url, limit, args.slow_replay_ms)
                label = f"hold at {limit} MB" if limit else "no hold"
                for f in figures:
                    print(
                        f"{label:>14}  {f['step']:<27} {f['rows']:>8} rows  "
                        f"WAL {f['wal_mb']:7.1f} MB  max replay lag {f['max_lag_mb']:6.1f} MB  "
                        f"{f['wall_s']:6.1f} s (held {f['held_s']:.1f} s)",
                        flush=True,
                    )
                total = sum(f["wall_s"] for f in figures)
                print(f"{label:>14}  all three: {total:.1f} s", flush=True)
        finally:
            server.drop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
