"""The app_db resource: URL forms, session settings, and errors that hide the password.

Touches: resources.AppDatabase and make_engine against the real server.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from session_cleanup_dagster.errors import ConfigError
from session_cleanup_dagster.resources import AppDatabase, make_engine


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "postgresql+psycopg"])
def test_every_accepted_url_form_is_driven_by_psycopg3(database_url: str, scheme: str) -> None:
    url = scheme + "://" + database_url.split("://", 1)[1]
    engine = make_engine(url)
    try:
        assert engine.dialect.driver == "psycopg"
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    finally:
        engine.dispose()


def test_each_session_sets_its_limits_and_application_name(database_url: str) -> None:
    resource = AppDatabase(
        url=database_url,
        application_name="cleanup-test",
        lock_timeout_ms=1500,
        statement_timeout_ms=30_000,
        idle_in_transaction_timeout_ms=45_000,
    )
    engine = resource.get_engine()
    try:
        with engine.connect() as conn:
            shown = {
                name: conn.execute(sa.text(f"SHOW {name}")).scalar_one()
                for name in (
                    "application_name",
                    "lock_timeout",
                    "statement_timeout",
                    "idle_in_transaction_session_timeout",
                    "client_connection_check_interval",
                    "jit",
                )
            }
    finally:
        engine.dispose()
    assert shown == {
        "application_name": "cleanup-test",
        "lock_timeout": "1500ms",
        "statement_timeout": "30s",
        "idle_in_transaction_session_timeout": "45s",
        "client_connection_check_interval": "2s",
        "jit": "off",
    }


def test_defaults_are_safe() -> None:
    resource = AppDatabase(url="postgresql://u@h/db")
    assert (resource.lock_timeout_ms, resource.statement_timeout_ms) == (2000, 60_000)
    assert resource.idle_in_transaction_timeout_ms == 60_000
    assert resource.db_schema == "public"


@pytest.mark.parametrize(
    "url",
    [
        "mysql://admin:Hunter2-secret@db.example.com/app",
        "not a url at all Hunter2-secret",
        "postgresql://admin:Hunter2-secret@db.example.com:notaport/app",
    ],
)
def test_malformed_url_is_a_config_error_without_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as raised:
        make_engine(url)
    assert "Hunter2-secret" not in str(raised.value)
    assert "postgresql://" in str(raised.value) or "port" in str(raised.value)


def test_describe_names_host_and_database_but_no_credentials() -> None:
    resource = AppDatabase(url="postgres://cleanup:Hunter2-secret@db.example.com:6543/app")
    assert resource.describe() == "db.example.com:6543/app"
    assert resource.password() == "Hunter2-secret"


@pytest.mark.parametrize(
    "schema", ['public"; DROP TABLE users; --', "Public", "a b", "", "public\n"]
)
def test_hostile_or_odd_schema_names_are_refused(schema: str) -> None:
    with pytest.raises(ConfigError, match="not a plain identifier"):
        AppDatabase(url="postgresql://u@h/db", db_schema=schema).validate_settings()


def test_creating_the_engine_does_not_connect() -> None:
    # Nothing listens on port 1: building the engine must still succeed (no connection).
    engine = make_engine("postgresql://u@127.0.0.1:1/db")
    engine.dispose()
