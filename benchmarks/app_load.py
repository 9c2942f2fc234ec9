"""An app-like load: paced writes on two connections, bounded in time and count.

Connection 1 updates a random user's open session (the app moving a user on the map), so
it meets the sessions ``expire_sessions`` is ending; connection 2 upserts a decline with
``ON CONFLICT (user_id, declined_user_id) DO UPDATE`` for a user whose open session stays
open past the cutoff, found through the app's unique index on open sessions, as an app
records a decline during the decliner's session.

Until 2026-11-29 the upsert took the user's latest session of any kind (``ORDER BY
started_at DESC``), which no index of the reference schema serves: every upsert scanned the
sessions table (97 ms at S, 720 ms at L), so the app's p99 measured those scans, idle or not,
and hid what the cleanup did to the app. Results before that date are not comparable on the
app's columns.

Each write is its own autocommit transaction, paced at a fixed interval, so the latencies
measure waiting (on locks, I/O, CPU) rather than our own throughput. It runs in a separate
process so the cleanup client's work never delays its clock.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

APP_NAME = "bench-app"

# Users whose open session stays open through a cleanup at ``cutoff``: the decliners.
STAYING_OPEN = (
    "SELECT user_id FROM after_hours_sessions"
    " WHERE ended_at IS NULL AND expires_at >= %s ORDER BY user_id"
)
UPDATE_SESSION = (
    "UPDATE after_hours_sessions SET fuzzed_latitude = fuzzed_latitude"
    " WHERE user_id = %s AND ended_at IS NULL"
)
UPSERT_DECLINE = """
INSERT INTO after_hours_declines (id, session_id, user_id, declined_user_id, created_at,
                                  decline_count, first_declined_at, last_session_id)
SELECT gen_random_uuid(), s.id, CAST(%(u)s AS varchar), CAST(%(d)s AS varchar), now(), 1,
       now(), s.id
FROM after_hours_sessions s WHERE s.user_id = CAST(%(u)s AS varchar) AND s.ended_at IS NULL
ON CONFLICT (user_id, declined_user_id) DO UPDATE
SET decline_count = after_hours_declines.decline_count + 1,
    last_session_id = EXCLUDED.last_session_id
"""


@dataclass(frozen=True)
class LoadSpec:
    url: str
    users: int
    cutoff: datetime
    interval_s: float = 0.01  # per connection: 100 writes/s each
    max_s: float = 900.0
    max_ops: int = 200_000
    seed: int = 1


def _worker(spec: LoadSpec, kind: str, stop: Any, out: list[tuple[float, float, str]]) -> None:
    rng = random.Random(f"{spec.seed}-{kind}")
    with psycopg.connect(spec.url, autocommit=True, application_name=APP_NAME) as conn:
        decliners: list[str] = []
        if kind == "decline":
            decliners = [r[0] for r in conn.execute(STAYING_OPEN, (spec.cutoff,))]
            if not decliners:
                raise RuntimeError(f"no session stays open past {spec.cutoff}: nobody to decline")
        started = time.monotonic()
        next_at = started
        count = 0
        while not stop.is_set() and count < spec.max_ops // 2:
            now = time.monotonic()
            if now - started > spec.max_s:
                break
            if next_at > now:
                time.sleep(next_at - now)
            next_at += spec.interval_s
            t0 = time.monotonic()
            if kind == "session":
                conn.execute(UPDATE_SESSION, (f"user_{rng.randint(1, spec.users)}",))
            else:
                user = rng.choice(decliners)
                other = f"user_{rng.randint(1, spec.users)}"
                if other == user:
                    continue
                conn.execute(UPSERT_DECLINE, {"u": user, "d": other})
            out.append((t0, time.monotonic() - t0, kind))
            count += 1


def _run(spec: LoadSpec, stop: Any, ready: Any, queue: Any) -> None:
    samples: dict[str, list[tuple[float, float, str]]] = {"session": [], "decline": []}
    errors: list[str] = []

    def work(kind: str) -> None:
        try:
            _worker(spec, kind, stop, samples[kind])
        except Exception as exc:  # reported by stop(): a load that died must not pass as quiet
            errors.append(f"{kind} writer: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(kind,)) for kind in samples]
    for thread in threads:
        thread.start()
    ready.set()
    for thread in threads:
        thread.join()
    queue.put((samples["session"] + samples["decline"], errors))


class AppLoad:
    """Start with ``start()``, stop with ``stop()``; ``stop()`` returns the per-write samples."""

    def __init__(self, spec: LoadSpec) -> None:
        ctx = mp.get_context("spawn")
        self.stop_event = ctx.Event()
        self.ready = ctx.Event()
        self.queue: Any = ctx.Queue()
        self.process = ctx.Process(
            target=_run, args=(spec, self.stop_event, self.ready, self.queue), daemon=True
        )

    def start(self) -> float:
        self.process.start()
        self.ready.wait(60)
        return time.monotonic()

    def stop(self) -> list[tuple[float, float, str]]:
        self.stop_event.set()
        samples, errors = self.queue.get(timeout=120)
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
        if errors:
            raise RuntimeError("the app load failed: " + "; ".join(errors))
        return list(samples)


def percentiles(seconds: list[float]) -> dict[str, Any]:
    """The count, and p50/p99/max in ms (None without samples), of latencies in seconds."""
    latencies = sorted(seconds)
    if not latencies:
        return {"ops": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 2)

    return {
        "ops": len(latencies),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": round(latencies[-1] * 1000, 2),
    }


def summarize(samples: list[tuple[float, float, str]], since: float) -> dict[str, Any]:
    """p50/p99/max in ms, the count, and writes that waited over a second."""
    stats = percentiles([s[1] for s in samples])
    if not samples:
        return {**stats, "over_1s": 0}
    return {
        **stats,
        "ops_by_kind": {k: sum(1 for s in samples if s[2] == k) for k in ("session", "decline")},
        "over_1s": sum(1 for s in samples if s[1] > 1.0),
        # For the latency-over-time plot: seconds since the cleanup started, ms.
        "series": [(round(s[0] - since, 3), round(s[1] * 1000, 2)) for s in samples],
    }
