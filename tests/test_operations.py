"""The job under a real daemon and webserver, with Postgres run storage, driven through GraphQL.

Touches: dagster.yaml (queue, monitoring, retries), the advisory lock (locking.py), the
sensors (sensors.py), cancellation in running.py, and the whole job on a seeded app database.
One stack serves the whole module; each test reseeds the app database.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from session_cleanup_dagster.seed import seed_database
from tests import model, pg
from tests.data import T
from tests.stack import Stack, dagster_home, running_stack

PARTITION = "2026-11-27"  # its window ends at T


def reseed(url: str, users: int) -> pg.Snapshot:
    pg.execute(
        url,
        "TRUNCATE users, after_hours_sessions, after_hours_declines, device_fingerprints CASCADE",
    )
    engine = pg.engine(url)
    try:
        seed_database(engine, users, anchor=T, create_schema=False)
    finally:
        engine.dispose()
    return pg.snapshot(url)


@pytest.fixture(scope="module")
def env(admin_url: str) -> Iterator[dict[str, str]]:
    with pg.scratch_database(admin_url) as storage_url, pg.scratch_database(admin_url) as app_url:
        pg.create_schema(app_url)
        yield {
            **os.environ,
            "DAGSTER_PG_URL": storage_url,
            "APP_DATABASE_URL": app_url,
            "SESSION_CLEANUP_SENSOR_INTERVAL_S": "2",
            "SESSION_CLEANUP_STUCK_RUN_GRACE_S": "8",
        }


@pytest.fixture(scope="module")
def stack(env: dict[str, str]) -> Iterator[Stack]:
    with dagster_home(env) as home, running_stack(env, home) as running:
        yield running


def test_partitioned_run_through_graphql_succeeds(stack: Stack, env: dict[str, str]) -> None:
    app_url = env["APP_DATABASE_URL"]
    before = reseed(app_url, 200)
    t0 = time.monotonic()
    run_id = stack.submit(partition=PARTITION)
    assert stack.wait_status(run_id, {"SUCCESS", "FAILURE", "CANCELED"}) == "SUCCESS"
    print("run took", time.monotonic() - t0)
    assert pg.snapshot(app_url) == model.cleanup(before, T)
