"""One real stack per module of tests/operations (a daemon, a webserver, Postgres storage)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests import pg
from tests.stack import AlertServer, Stack, dagster_home, running_stack


@pytest.fixture(scope="module")
def alerts() -> Iterator[AlertServer]:
    server = AlertServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def env(admin_url: str, alerts: AlertServer) -> Iterator[dict[str, str]]:
    with pg.scratch_database(admin_url) as storage_url, pg.scratch_database(admin_url) as app_url:
        pg.create_schema(app_url)
        yield {
            **os.environ,
            "DAGSTER_PG_URL": storage_url,
            "APP_DATABASE_URL": app_url,
            "SESSION_CLEANUP_SENSOR_INTERVAL_S": "2",
            "SESSION_CLEANUP_STUCK_RUN_GRACE_S": "8",
            "SESSION_CLEANUP_ALERT_WEBHOOK_URL": alerts.url,
        }


@pytest.fixture(scope="module")
def stack(env: dict[str, str]) -> Iterator[Stack]:
    with dagster_home(env) as home, running_stack(env, home) as running:
        yield running


@pytest.fixture
def app_url(env: dict[str, str]) -> str:
    return env["APP_DATABASE_URL"]
