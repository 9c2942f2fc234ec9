"""Fixtures shared by the suite: a real PostgreSQL server and one fresh database per test.

The server is the one SESSION_CLEANUP_TEST_ADMIN_URL names, else an embedded PostgreSQL 16
from the pgserver wheel that the suite starts and stops itself (a fresh machine has no other).
Every test database has a unique name and is dropped afterwards, so two runs of the suite at
once never meet, and the server's own databases are never touched. A skipped test fails the
run (tests/no_skips.py).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from tests import pg

# Hypothesis profiles: "ci" (the default) runs at least 200 examples per property; "long"
# (HYPOTHESIS_PROFILE=long) runs many more, for a nightly or a pre-release check. Examples
# talk to a real PostgreSQL, so there is no per-example deadline, and the property tests
# reuse one database per test function (hence the function-scoped-fixture check is off).
# No example database on disk: a failure prints its reproduction blob instead.
_BASE = settings(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile("ci", parent=_BASE, max_examples=200)
settings.register_profile("long", parent=_BASE, max_examples=5000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.import_plugin("tests.no_skips")
    # A suite started in the background (a CI runner, `cmd &`) inherits SIGINT ignored.
    # Dagster's setup_interrupt_handlers copies SIGINT's disposition to SIGTERM, so after the
    # first in-process call every child started here (the `tail` processes of Dagster's
    # compute-log capture) would ignore SIGTERM, and each capture would wait 30 s for its
    # tail to end. Start from the foreground's disposition either way.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first, so that ``./run test``'s workers (pytest-xdist, a module each) start
    the long modules together instead of ending on one of them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _restore_environment() -> Iterator[None]:
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def admin_url() -> Iterator[str]:
    """A superuser URL to a maintenance database on a real server."""
    with pg.server() as url:
        yield url


@pytest.fixture(scope="session")
def password_server() -> Iterator[pg.PasswordServer]:
    """A private embedded PostgreSQL that checks passwords (the shared server trusts all)."""
    with pg.password_server() as server:
        yield server


@pytest.fixture
def database_url(admin_url: str) -> Iterator[str]:
    """A fresh, empty database of this test's own; dropped afterwards."""
    with pg.scratch_database(admin_url) as url:
        yield url


@pytest.fixture
def app_url(database_url: str) -> str:
    """A fresh database holding the app's reference schema, with no rows."""
    pg.create_schema(database_url)
    return database_url
