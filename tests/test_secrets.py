"""No password anywhere: real `dagster job execute` processes on Postgres storage, then a search.

Touches: the Dagster CLI as a subprocess (the code location, the instance from dagster.yaml,
run and event storage in PostgreSQL via DAGSTER_PG_URL, the local compute log manager) and
a private embedded PostgreSQL with password authentication that holds both the app database
and the Dagster storage database, each reached by its own role with a recognizable password.

Two runs: one succeeds; one fails because APP_DATABASE_URL carries a wrong password. Then
both passwords (and the wrong one) are searched for in: every row of every table of the
Dagster storage database (event log, runs with their run config and tags, ...), the event
log read back through the instance API, run config and tags of each run, every file under
DAGSTER_HOME (compute logs, ...), the processes' stdout and stderr, and the failure's
exception messages. Positive controls make sure each searched place holds what it should,
so an empty search cannot pass by accident.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from session_cleanup_dev import seed

from session_cleanup_dagster import errors
from tests import data, pg

APP_PASSWORD = "AppPw-Zq7xK2-recognizable"
DAGSTER_PASSWORD = "DagPw-Mv9tR4-recognizable"
WRONG_PASSWORD = "WrongPw-Lc3nB8-recognizable"
SECRETS = (APP_PASSWORD, DAGSTER_PASSWORD, WRONG_PASSWORD)
GRANTS = Path(__file__).resolve().parent.parent / "docs" / "grants.sql"

DAGSTER_YAML = """\
storage:
  postgres:
    postgres_url:
      env: DAGSTER_PG_URL
telemetry:
  enabled: false
"""

RUN_CONFIG = """\
ops:
  expire_sessions: {config: {as_of: "2026-11-28T04:00:00Z"}}
  purge_declines: {config: {as_of: "2026-11-28T04:00:00Z"}}
  remove_orphan_fingerprints: {config: {as_of: "2026-11-28T04:00:00Z"}}
"""


def _execute(home: Path, app_url: str, dagster_url: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "APP_DATABASE_URL": app_url,
        "DAGSTER_PG_URL": dagster_url,
    }
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "dagster",
            "job",
            "execute",
            "-m",
            "session_cleanup_dagster.definitions",
            "-j",
            "session_cleanup_job",
            "-c",
            str(home / "run.yaml"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=home,
        timeout=300,
        check=False,
    )


def _every_row_as_text(url: str) -> str:
    """Every row of every table in the database's public schema, as text."""
    chunks: list[str] = []
    with psycopg.connect(url) as conn:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            ).fetchall()
        ]
        for table in tables:
            rows = conn.execute(f'SELECT t::text FROM public."{table}" t').fetchall()
            chunks.extend(row[0] for row in rows)
    return "\n".join(chunks)


@pytest.fixture
def databases(password_server: pg.PasswordServer):
    """The app database (seeded, job role per docs/grants.sql) and the Dagster storage one."""
    suffix = os.urandom(4).hex()
    app_db, dagster_db = f"sct_app_{suffix}", f"sct_dagster_{suffix}"
    app_role, dagster_role = f"sct_app_{suffix}", f"sct_dagster_{suffix}"
    admin = password_server.admin_url
    password_server.create_role(dagster_role, DAGSTER_PASSWORD)
    pg.execute(admin, f'CREATE DATABASE "{app_db}"')
    pg.execute(admin, f'CREATE DATABASE "{dagster_db}" OWNER "{dagster_role}"')
    try:
        app_admin = pg.database_url(admin, app_db)
        engine = pg.engine(app_admin)
        try:
            seed.seed_database(engine, 40, anchor=data.T)
        finally:
            engine.dispose()
        with psycopg.connect(app_admin, autocommit=True) as conn:
            conn.execute(re.sub(r"\bsession_cleanup\b", app_role, GRANTS.read_text()).encode())
            conn.execute(f"ALTER ROLE \"{app_role}\" PASSWORD '{APP_PASSWORD}'".encode())
        yield {
            "app": password_server.url(app_role, APP_PASSWORD, app_db),
            "app_wrong": password_server.url(app_role, WRONG_PASSWORD, app_db),
            "dagster": password_server.url(dagster_role, DAGSTER_PASSWORD, dagster_db),
            "dagster_admin": pg.database_url(admin, dagster_db),
            "app_role": app_role,
        }
    finally:
        for database in (app_db, dagster_db):
            pg.execute(admin, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        for role in (app_role, dagster_role):
            pg.execute(admin, f'DROP ROLE IF EXISTS "{role}"')


@pytest.mark.slow
def test_passwords_appear_nowhere_after_a_good_and_a_failing_run(
    databases: dict[str, str], tmp_path: Path
) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(DAGSTER_YAML)
    (home / "run.yaml").write_text(RUN_CONFIG)

    good = _execute(home, databases["app"], databases["dagster"])
    assert good.returncode == 0, good.stdout + good.stderr
    bad = _execute(home, databases["app_wrong"], databases["dagster"])
    assert bad.returncode != 0

    os.environ["DAGSTER_PG_URL"] = databases["dagster"]
    searched: dict[str, str] = {
        "stdout and stderr": good.stdout + good.stderr + bad.stdout + bad.stderr,
        "every row of the storage database": _every_row_as_text(databases["dagster_admin"]),
    }
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        assert {run.status for run in runs} == {
            dg.DagsterRunStatus.SUCCESS,
            dg.DagsterRunStatus.FAILURE,
        }
        assert len(runs) == 2
        events, configs, failures = [], [], []
        for run in runs:
            configs.append(json.dumps(run.run_config, default=str) + json.dumps(dict(run.tags)))
            for entry in instance.all_logs(run.run_id):
                events.append(dg.serialize_value(entry))
                event = entry.dagster_event
                error = getattr(event.event_specific_data, "error", None) if event else None
                while error is not None:
                    failures.append(error.message + "".join(error.stack))
                    error = error.cause
        searched["event log (instance API)"] = "\n".join(events)
        searched["run config and tags"] = "\n".join(configs)
        searched["exception messages"] = "\n".join(failures)
        # Compute logs and anything else the instance wrote under DAGSTER_HOME.
        files = [path for path in home.rglob("*") if path.is_file()]
        searched["files under DAGSTER_HOME"] = "\n".join(
            path.read_text(errors="replace") for path in files
        )
        compute_logs = [path for path in files if path.suffix in (".out", ".err", ".complete")]

    # Positive controls: each place holds what a leak would sit next to.
    assert compute_logs, sorted(str(p) for p in files)
    assert "password authentication failed" in searched["exception messages"]
    assert "password authentication failed" in searched["event log (instance API)"]
    assert "password authentication failed" in searched["every row of the storage database"]
    assert "2026-11-28T04:00:00Z" in searched["run config and tags"]
    assert databases["app_role"] in searched["exception messages"]  # the user name is fine
    assert "expire_sessions" in searched["stdout and stderr"]
    for place, text in searched.items():
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} leaked into {place}"


@pytest.mark.parametrize(
    "template",
    [
        "postgresql://cleanup:{quote}@db.example.com:5432/app",
        "postgresql://cleanup@db.example.com:5432/app?password={quote}",
        "postgresql://cleanup@db.example.com:5432/app?password={plus}",
        "password authentication failed; password was {raw}",
    ],
)
def test_redact_hides_a_password_however_a_url_writes_it(template: str) -> None:
    # A password with the characters a URL must encode (the recognizable ones above need none).
    secret = "p@ss w/rd+%&=?"
    forms = {
        "raw": secret,
        "quote": urllib.parse.quote(secret, safe=""),
        "plus": urllib.parse.quote_plus(secret),
    }
    text = template.format(**forms)
    redacted = errors.redact(text, [secret])
    assert "***" in redacted
    for form in forms.values():
        assert form not in redacted
    assert "db.example.com" in redacted or "authentication failed" in redacted
