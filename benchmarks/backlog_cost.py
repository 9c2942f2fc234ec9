"""What counting the backlog costs, next to the step it follows (see backlog.py).

    .venv/bin/python -m benchmarks.backlog_cost [USERS]

Seeds a scratch database (on SESSION_CLEANUP_TEST_ADMIN_URL, or the local server, or an
embedded one), runs each step at the seed's anchor, then times ``backlog.probe`` exactly and
sampled. It prints each probe's time as a ratio of the step's own time in the same run.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime

from session_cleanup_dev.seed import seed_database

from session_cleanup_dagster import backlog, steps
from tests import pg

STEPS = {
    "expire_sessions": steps.expire_sessions,
    "purge_declines": steps.purge_declines,
    "remove_orphan_fingerprints": steps.remove_orphan_fingerprints,
}


def main(users: int) -> None:
    anchor = datetime.now(UTC).replace(microsecond=0)
    with pg.server() as admin, pg.scratch_database(admin) as url:
        engine = pg.engine(url)
        try:
            seed_database(engine, users, anchor=anchor)
            print(f"{users} users; probe time as a share of the step's time")
            for name, step in STEPS.items():
                result = step(engine, anchor)
                with engine.connect() as conn:
                    started = time.perf_counter()
                    exact = backlog.probe(conn, name, anchor)
                    exact_s = time.perf_counter() - started
                    started = time.perf_counter()
                    sampled = backlog.probe(conn, name, anchor, exact_max_pages=0, sample_pages=256)
                    sampled_s = time.perf_counter() - started
                print(
                    f"{name:<28} step {result.duration_s:6.2f} s | exact {exact_s * 1000:6.0f} ms "
                    f"({exact_s / result.duration_s:.3f}) {exact.method} | sampled "
                    f"{sampled_s * 1000:6.0f} ms ({sampled_s / result.duration_s:.3f}) "
                    f"{sampled.method}"
                )
        finally:
            engine.dispose()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
