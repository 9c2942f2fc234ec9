"""The bad-input matrix: every invalid setting is refused before any work, and says what is valid.

Touches: the whole job through execute_in_process (config, the app_db resource, URL parsing,
prerequisites, error sorting and retries) on a fresh database per test, plus a private
embedded PostgreSQL with password authentication for the wrong-password and missing-database
cases (the shared server trusts every local connection). Each entry here is a row of the
docs/safety.md's "Bad-input matrix"; tests/test_job.py holds the rest (batch_size 0, retention_days
100000, as_of "yesterday", as_of in the future, missing table, column and index, wrong
column type, role without DELETE, unreachable server).

For each entry: the exact message, how many attempts (1: permanent, not retried), that no
step started where the failure is in resource setup, that the whole database is unchanged,
and, for URLs, that the password appears nowhere: not in any event message, error, stack
or cause, and not on the process's stdout or stderr.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
import pytest

from session_cleanup_dagster import steps
from session_cleanup_dagster.definitions import defs
from session_cleanup_dagster.resources import AppDatabase
from tests import data, pg
from tests.data import T
from tests.jobrun import OPS, attempts, error_texts, failure_message, started_steps

PASSWORD = "Hunter2-Bad-Input-Pw-61"  # recognizable: must never be printed


def run(
    app_db: AppDatabase, op_config: dict[str, dict[str, Any]] | None = None
) -> dg.ExecuteInProcessResult:
    job = defs.resolve_job_def("session_cleanup_job")
    run_config = {"ops": {op: {"config": (op_config or {}).get(op, {})} for op in OPS}}
    return job.execute_in_process(
        run_config=run_config,
        resources={"app_db": app_db},
        partition_key="2026-11-27",
        raise_on_error=False,
    )


# --- run config: each field, invalid values ------------------------------------------------

CONFIG_MATRIX = [
    ("expire_sessions", "batch_size", -5, "batch_size is -5; use 1 to 50000."),
    ("purge_declines", "batch_size", 50_001, "batch_size is 50001; use 1 to 50000."),
    (
        "remove_orphan_fingerprints",
        "max_rows",
        0,
        "max_rows is 0; use a positive number, or leave it empty for no cap.",
    ),
    (
        "expire_sessions",
        "max_rows",
        -1,
        "max_rows is -1; use a positive number, or leave it empty for no cap.",
    ),
    ("expire_sessions", "retry_delay_s", 0, "retry_delay_s is 0; use 0.1 to 5 s."),
    ("purge_declines", "retry_delay_s", 60, "retry_delay_s is 60; use 0.1 to 5 s."),
    ("purge_declines", "retention_days", 0, "retention_days is 0; use 1 to 3650 days."),
    ("purge_declines", "retention_days", -7, "retention_days is -7; use 1 to 3650 days."),
    ("purge_declines", "retention_days", 3651, "retention_days is 3651; use 1 to 3650 days."),
    (
        "remove_orphan_fingerprints",
        "grace_minutes",
        0,
        "grace_minutes is 0; use 1 to 10080 (one week).",
    ),
    (
        "remove_orphan_fingerprints",
        "grace_minutes",
        -60,
        "grace_minutes is -60; use 1 to 10080 (one week).",
    ),
    (
        "remove_orphan_fingerprints",
        "grace_minutes",
        10_081,
        "grace_minutes is 10081; use 1 to 10080 (one week).",
    ),
    (
        "expire_sessions",
        "as_of",
        "2026-11-28T04:00:00",
        "as_of '2026-11-28T04:00:00' has no timezone, so it could mean any of 24 instants; "
        "add Z (UTC) or an offset such as +01:00.",
    ),
    (
        "purge_declines",
        "as_of",
        "28/11/2026 04:00",
        "as_of '28/11/2026 04:00' is not an ISO 8601 instant; write it like "
        "2026-11-28T04:00:00Z or 2026-11-28T05:00:00+01:00.",
    ),
]


@pytest.mark.parametrize(("op", "field", "value", "message"), CONFIG_MATRIX)
def test_invalid_op_config_is_rejected_before_any_work(
    app_url: str, op: str, field: str, value: Any, message: str
) -> None:
    data.boundaries(app_url)
    before = pg.snapshot(app_url)
    # The other ops run as dry runs, so the whole database must come out unchanged.
    config = {name: {"dry_run": True} for name in OPS}
    config[op] = {field: value}
    # as_of is ignored by partitioned runs, so those entries run unpartitioned.
    job = defs.resolve_job_def("session_cleanup_job")
    result = job.execute_in_process(
        run_config={"ops": {name: {"config": config[name]} for name in OPS}},
        resources={"app_db": AppDatabase(url=app_url)},
        partition_key=None if field == "as_of" else "2026-11-27",
        raise_on_error=False,
    )
    assert not result.success
    assert f"{op}: invalid run config, nothing was done. {message}" in failure_message(result, op)
    assert attempts(result, op) == 1
    for other in OPS:
        if other != op:
            assert result.is_node_success(other)
    assert pg.snapshot(app_url) == before


def test_empty_as_of_means_unset_and_is_accepted(app_url: str) -> None:
    result = run(AppDatabase(url=app_url), {"expire_sessions": {"as_of": "  "}})
    assert result.success


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (
            {"batch_size": "ten"},
            'Invalid scalar at path root:ops:expire_sessions:config:batch_size. Value "ten"',
        ),
        ({"batchsize": 10}, 'Received unexpected config entry "batchsize"'),
        (
            {"dry_run": "yes"},
            'Invalid scalar at path root:ops:expire_sessions:config:dry_run. Value "yes"',
        ),
    ],
)
def test_run_config_of_the_wrong_shape_is_refused_before_the_run_starts(
    app_url: str, config: dict[str, Any], fragment: str
) -> None:
    data.boundaries(app_url)
    before = pg.snapshot(app_url)
    with pytest.raises(dg.DagsterInvalidConfigError) as raised:
        run(AppDatabase(url=app_url), {"expire_sessions": config})
    assert fragment in str(raised.value)
    assert pg.snapshot(app_url) == before


# --- the app_db resource: settings and the one configurable identifier ----------------------

HOSTILE_SCHEMAS = [
    "public; DROP TABLE users; --",
    'public" CASCADE; --',
    "public\n",
    "Public",
    "public.users",
    "pg_temp'",
    "a" * 64,
    "",
    "sch\u00e9ma",
    "$1",
]


@pytest.mark.parametrize("schema", HOSTILE_SCHEMAS)
def test_hostile_schema_is_refused_before_any_connection(app_url: str, schema: str) -> None:
    data.boundaries(app_url)
    before = pg.snapshot(app_url)
    result = run(AppDatabase(url=app_url, db_schema=schema))
    assert not result.success
    assert started_steps(result) == []
    text = "\n".join(error_texts(result))
    assert f"app_db.db_schema {schema!r} is not a plain identifier" in text
    assert pg.snapshot(app_url) == before  # users (and everything else) still there


@pytest.mark.parametrize("schema", HOSTILE_SCHEMAS)
def test_hostile_schema_is_refused_by_the_step_functions_too(schema: str) -> None:
    # Nothing listens on port 1: the refusal must come before any connection.
    engine = pg.engine("postgresql://nobody@127.0.0.1:1/none")
    try:
        for step in (steps.expire_sessions, steps.purge_declines, steps.remove_orphan_fingerprints):
            with pytest.raises(ValueError, match="is not a plain identifier"):
                step(engine, T, schema=schema)
    finally:
        engine.dispose()


def test_schema_that_is_a_reserved_word_is_quoted_and_works(database_url: str) -> None:
    pg.create_schema(database_url, "select")
    pg.execute(database_url, 'INSERT INTO "select".users (id) VALUES (%s)', ("u1",))
    pg.execute(
        database_url,
        'INSERT INTO "select".after_hours_sessions (id, user_id, expires_at, latitude,'
        " longitude, fuzzed_latitude, fuzzed_longitude) VALUES (%s, 'u1', %s, 1, 1, 1, 1)",
        (data.uid(1), T - data.DAY),
    )
    result = run(AppDatabase(url=database_url, db_schema="select"))
    assert result.success
    state = pg.snapshot(database_url, "select")
    assert state["after_hours_sessions"][0]["ended_at"] == T - data.DAY


def test_schema_that_does_not_exist_fails_fast_and_names_it(app_url: str) -> None:
    result = run(AppDatabase(url=app_url, db_schema="nosuch"))
    for op in OPS:
        assert "schema nosuch does not exist in this database" in failure_message(result, op)
        assert attempts(result, op) == 1


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("lock_timeout_ms", 0, "app_db.lock_timeout_ms is 0: use 1 to 3600000 (milliseconds)."),
        (
            "statement_timeout_ms",
            3_600_001,
            "app_db.statement_timeout_ms is 3600001: use 1 to 3600000 (milliseconds).",
        ),
        (
            "idle_in_transaction_timeout_ms",
            -1,
            "app_db.idle_in_transaction_timeout_ms is -1: use 1 to 3600000 (milliseconds).",
        ),
        ("connect_timeout_s", 0, "app_db.connect_timeout_s is 0: use 1 to 300 (seconds)."),
        ("connect_timeout_s", 301, "app_db.connect_timeout_s is 301: use 1 to 300 (seconds)."),
    ],
)
def test_invalid_resource_setting_is_refused_before_any_connection(
    setting: str, value: int, message: str
) -> None:
    # Unreachable on purpose: a connection attempt would show up as an error about it.
    settings: dict[str, Any] = {"url": "postgresql://nobody@127.0.0.1:1/none", setting: value}
    app_db = AppDatabase(**settings)
    result = run(app_db)
    assert not result.success
    assert started_steps(result) == []
    assert message in "\n".join(error_texts(result))


# --- APP_DATABASE_URL -----------------------------------------------------------------------


def _assert_secret_nowhere(
    result: dg.ExecuteInProcessResult, capfd: pytest.CaptureFixture[str], *secrets: str
) -> None:
    out, err = capfd.readouterr()
    for secret in secrets:
        assert secret not in out and secret not in err
        for text in error_texts(result):
            assert secret not in text


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            f"postgresql://cleanup:{PASSWORD}@127.0.0.1:notaport/app",
            "could not parse the database URL; expected one of postgresql://..., "
            "postgres://..., postgresql+psycopg://...",
        ),
        (
            f"mysql://cleanup:{PASSWORD}@127.0.0.1/app",
            "unsupported database URL 'mysql://cleanup:***@127.0.0.1/app': the scheme must be "
            "one of postgresql://, postgres://, postgresql+psycopg://",
        ),
        (
            f"mysql://cleanup@127.0.0.1/app?password={PASSWORD}",
            "unsupported database URL 'mysql://cleanup@127.0.0.1/app': the scheme must be",
        ),
        (PASSWORD, "could not parse the database URL"),
        ("", "could not parse the database URL"),
        (f"postgresql://cleanup:{PASSWORD}@[::1/app", "could not parse the database URL"),
    ],
)
def test_malformed_url_is_refused_without_the_password(
    url: str, message: str, capfd: pytest.CaptureFixture[str]
) -> None:
    result = run(AppDatabase(url=url))
    assert not result.success
    assert started_steps(result) == []  # nothing connected, nothing to retry
    assert message in "\n".join(error_texts(result))
    _assert_secret_nowhere(result, capfd, PASSWORD)


def test_unresolvable_host_fails_once_per_op_naming_the_host(
    capfd: pytest.CaptureFixture[str],
) -> None:
    url = f"postgresql://cleanup:{PASSWORD}@no-such-host.invalid:5432/app"
    result = run(AppDatabase(url=url))
    for op in OPS:
        message = failure_message(result, op)
        assert f"{op} on no-such-host.invalid:5432/app: failed to resolve host" in message
        assert message.rstrip().endswith("Check the host name in APP_DATABASE_URL.")
        assert attempts(result, op) == 1
    _assert_secret_nowhere(result, capfd, PASSWORD)


@pytest.mark.parametrize("form", ["user:password@", "?password="])
def test_wrong_password_fails_once_per_op_without_printing_either_password(
    password_server: pg.PasswordServer, capfd: pytest.CaptureFixture[str], form: str
) -> None:
    role = "sct_wrongpw"
    password_server.create_role(role, PASSWORD)
    try:
        wrong = "Wr0ng-" + PASSWORD
        before = password_server.auth_failures(role)
        url = password_server.url(role, wrong)
        if form == "?password=":  # libpq's other place for it
            url = pg.with_query(password_server.url(role, None), password=wrong)
        result = run(AppDatabase(url=url))
        assert not result.success
        for op in OPS:
            message = failure_message(result, op)
            assert f'password authentication failed for user "{role}"' in message
            assert "Check the user name and password in APP_DATABASE_URL." in message
            assert attempts(result, op) == 1
        # No retry storm: one refused login per op, counted by the server itself.
        assert password_server.auth_failures(role) - before == len(OPS)
        _assert_secret_nowhere(result, capfd, PASSWORD, wrong)
    finally:
        pg.execute(password_server.admin_url, f'DROP ROLE "{role}"')


def test_missing_database_fails_once_per_op_naming_it(
    password_server: pg.PasswordServer, capfd: pytest.CaptureFixture[str]
) -> None:
    role = "sct_nodb"
    password_server.create_role(role, PASSWORD)
    try:
        url = password_server.url(role, PASSWORD, "no_such_app_db")
        result = run(AppDatabase(url=url))
        for op in OPS:
            message = failure_message(result, op)
            assert 'database "no_such_app_db" does not exist' in message
            assert "Check the database name at the end of APP_DATABASE_URL." in message
            assert attempts(result, op) == 1
        log = password_server.log_path.read_text(errors="replace")
        assert log.count('database "no_such_app_db" does not exist') == len(OPS)
        _assert_secret_nowhere(result, capfd, PASSWORD)
    finally:
        pg.execute(password_server.admin_url, f'DROP ROLE "{role}"')
