"""An app-like load: paced writes on two connections, bounded in time and count.

Connection 1 updates a random user's open session (the app moving a user on the map);
connection 2 upserts a decline with ``ON CONFLICT (user_id, declined_user_id) DO UPDATE``.
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
from typing import Any

import psycopg

APP_NAME = "bench-app"

UPDATE_SESSION = (
    "UPDATE after_hours_sessions SET fuzzed_latitude = fuzzed_latitude"
    " WHERE user_id = %s AND ended_at IS NULL"
)
UPSERT_DECLINE = """
INSERT INTO after_hours_declines (id, session_id, user_id, declined_user_id, created_at,
                                  decline_count, first_declined_at, last_session_id)
SELECT gen_random_uuid(), s.id, CAST(%(u)s AS varchar), CAST(%(d)s AS varchar), now(), 1,
       now(), s.id
FROM after_hours_sessions s WHERE s.user_id = CAST(%(u)s AS varchar)
ORDER BY s.started_at DESC LIMIT 1
ON CONFLICT (user_id, declined_user_id) DO UPDATE
SET decline_count = after_hours_declines.decline_count + 1,
    last_session_id = EXCLUDED.last_session_id
"""


@dataclass(frozen=True)
class LoadSpec:
    url: str
    users: int
    interval_s: float = 0.01  # per connection: 100 writes/s each
    max_s: float = 900.0
    max_ops: int = 200_000
    seed: int = 1


def _worker(spec: LoadSpec, kind: str, stop: Any, out: list[tuple[float, float, str]]) -> None:
    rng = random.Random(f"{spec.seed}-{kind}")
    with psycopg.connect(spec.url, autocommit=True, application_name=APP_NAME) as conn:
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
            user = f"user_{rng.randint(1, spec.users)}"
            t0 = time.monotonic()
            if kind == "session":
                conn.execute(UPDATE_SESSION, (user,))
            else:
                other = f"user_{rng.randint(1, spec.users)}"
                if other == user:
                    continue
                conn.execute(UPSERT_DECLINE, {"u": user, "d": other})
            out.append((t0, time.monotonic() - t0, kind))
            count += 1


def _run(spec: LoadSpec, stop: Any, ready: Any, queue: Any) -> None:
    samples: dict[str, list[tuple[float, float, str]]] = {"session": [], "decline": []}
    threads = [
        threading.Thread(target=_worker, args=(spec, kind, stop, samples[kind])) for kind in samples
    ]
    for thread in threads:
        thread.start()
    ready.set()
    for thread in threads:
        thread.join()
    queue.put(samples["session"] + samples["decline"])


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
        samples: list[tuple[float, float, str]] = self.queue.get(timeout=120)
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
        return samples


def summarize(samples: list[tuple[float, float, str]], since: float) -> dict[str, Any]:
    """p50/p99/max in ms, the count, and writes that waited over a second."""
    latencies = sorted(s[1] for s in samples)
    if not latencies:
        return {"ops": 0, "p50_ms": None, "p99_ms": None, "max_ms": None, "over_1s": 0}

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 2)

    return {
        "ops": len(latencies),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": round(latencies[-1] * 1000, 2),
        "over_1s": sum(1 for x in latencies if x > 1.0),
        # For the latency-over-time plot: seconds since the cleanup started, ms.
        "series": [(round(s[0] - since, 3), round(s[1] * 1000, 2)) for s in samples],
    }
