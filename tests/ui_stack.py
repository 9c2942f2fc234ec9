"""The Dagster stack for the browser tests: tests/stack.py's, on a given app database.

dagster-webserver and dagster-daemon run with the repo's dagster.yaml (Postgres run storage
in a scratch database, as in production) on a temporary DAGSTER_HOME; both are stopped, and
the home removed, also when a test fails.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from tests.stack import Stack, dagster_home, running_stack

__all__ = ["Stack", "ui_stack"]


@contextmanager
def ui_stack(app_url: str, storage_url: str, start_date: str) -> Iterator[Stack]:
    """Run webserver and daemon on the app database ``app_url``; stop both on exit."""
    env = {
        **os.environ,
        "DAGSTER_PG_URL": storage_url,
        "APP_DATABASE_URL": app_url,
        "SESSION_CLEANUP_START_DATE": start_date,
    }
    with dagster_home(env) as home, running_stack(env, home) as stack:
        yield stack
