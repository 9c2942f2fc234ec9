"""The ``session-cleanup`` command, run as a user would, in a subprocess.

Touches: cli, seed, demo (embedded PostgreSQL from the pgserver wheel) and the real job.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg

from tests import pg


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # The console script sits beside this interpreter (the venv is not always on PATH).
    beside = Path(sys.executable).parent / "session-cleanup"
    exe = str(beside) if beside.exists() else shutil.which("session-cleanup")
    assert exe is not None, "the package's console script is not installed"
    return subprocess.run(
        [exe, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def test_seed_creates_the_schema_and_deterministic_rows(database_url: str) -> None:
    done = _cli(
        "seed",
        "--database-url",
        database_url,
        "--scale",
        "100",
        "--anchor",
        "2026-11-28T04:00:00Z",
    )
    assert done.returncode == 0, done.stderr
    counts = {
        line.split()[0]: int(line.split()[1]) for line in done.stdout.splitlines() if line.strip()
    }
    assert counts == {
        "users": 100,
        "after_hours_sessions": 500,
        "after_hours_declines": 500,
        "device_fingerprints": 150,
    }
    state = pg.snapshot(database_url)
    assert len(state["after_hours_sessions"]) == 500


def test_seed_rejects_a_bad_scale_and_a_bad_url() -> None:
    bad_scale = _cli("seed", "--database-url", "postgresql://x@127.0.0.1/x", "--scale", "huge")
    assert bad_scale.returncode == 2
    assert "--scale" in bad_scale.stderr
    bad_url = _cli("seed", "--database-url", "mysql://root:hunter2@db/x", "--scale", "10")
    assert bad_url.returncode == 2
    assert "hunter2" not in bad_url.stderr
    assert "postgresql://" in bad_url.stderr


def test_seed_never_takes_its_database_from_app_database_url(database_url: str) -> None:
    # In a production pod APP_DATABASE_URL is the production database.
    done = _cli("seed", "--scale", "10", env={"APP_DATABASE_URL": database_url})
    assert done.returncode == 2
    assert "Missing option '--database-url'" in done.stderr
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
    assert row == (0,)


def test_demo_runs_end_to_end_on_an_embedded_server() -> None:
    done = _cli("demo", "--users", "300")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "Run succeeded; nothing left that the contract says to change." in out
    assert "Embedded PostgreSQL stopped and removed." in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert rows["after_hours_declines"][0] == "1500"
    assert int(rows["purge_declines"][0]) > 0
    assert rows["purge_declines"][1] == "0"
