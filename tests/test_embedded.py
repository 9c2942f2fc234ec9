"""The embedded PostgreSQL (pgserver): start, use, stop, and leave nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import sqlalchemy as sa
from session_cleanup_dev.embedded import embedded_postgres, server_answers
from session_cleanup_dev.seed import seed_database
from sqlalchemy.pool import NullPool

from session_cleanup_dagster.urls import psycopg_url


def _state(pid: int) -> str | None:
    """The process state letter from /proc (None if the process is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    # A zombie has exited; it only waits for its parent (here: a lazily reaping init) to reap it.
    return _state(pid) not in (None, "Z")


def children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


def live_postgres_processes() -> dict[int, str]:
    """Like ``pgrep -af postgres``, without zombies."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and alive(int(entry.name)):
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "postgres" in cmdline:
                found[int(entry.name)] = cmdline.strip()
    return found


def test_embedded_server_lifecycle(admin_url: str) -> None:
    assert server_answers(admin_url)
    with embedded_postgres() as server:
        assert server_answers(server.admin_url)
        assert server.admin_url.startswith("postgresql://postgres@/postgres?host=")
        postmaster = server.pid
        workers = children(postmaster)
        assert workers, "a running postmaster has background workers"
        ours = {postmaster, *workers}
        assert postmaster in live_postgres_processes()

        url = server.create_database("seeded")
        assert url == server.url("seeded")
        engine = sa.create_engine(psycopg_url(url), poolclass=NullPool)
        try:
            counts = seed_database(engine, 200)
            with engine.connect() as conn:
                version = conn.execute(sa.text("SHOW server_version_num")).scalar_one()
        finally:
            engine.dispose()
        assert counts == {
            "users": 200,
            "after_hours_sessions": 1000,
            "after_hours_declines": 1000,
            "device_fingerprints": 300,
        }
        assert int(version) >= 160000
        data_dir = server.data_dir
        temp_root = data_dir.parent
        assert (data_dir / "PG_VERSION").exists()

    assert not [pid for pid in ours if alive(pid)]
    assert not data_dir.exists()
    assert not temp_root.exists()
    assert not server_answers(server.admin_url)
    after = live_postgres_processes()
    assert not [cmd for cmd in after.values() if str(data_dir) in cmd]
    # The suite's server (another embedded one, or the one configured) still answers:
    # stopping ours left it alone. (Its backends come and go with other clients, so compare
    # answers, not process lists.)
    assert server_answers(admin_url)


def test_stopped_and_removed_on_exception() -> None:
    with pytest.raises(RuntimeError, match="boom"), embedded_postgres() as server:
        pid, data_dir = server.pid, server.data_dir
        raise RuntimeError("boom")
    assert not alive(pid)
    assert not data_dir.parent.exists()


def test_stopped_despite_stale_pgserver_handle() -> None:
    """pgserver skips the stop when its handle list names another process; we do not."""
    with embedded_postgres() as server:
        pid = server.pid
        handles = server.data_dir / ".handle_pids.json"
        # A pid that cannot exist: what a killed process leaves behind.
        handles.write_text(json.dumps([*json.loads(handles.read_text()), 2**22 + 1]))
    assert not alive(pid)
    assert not server.data_dir.exists()


def test_explicit_data_dir_is_kept_and_reused() -> None:
    parent = Path(tempfile.mkdtemp(prefix="sct-embedded-test-"))
    data_dir = parent / "pg"
    try:
        with embedded_postgres(data_dir) as server:
            assert server.data_dir == data_dir.resolve()
            server.create_database("kept")
            first_pid = server.pid
        assert not alive(first_pid)
        assert (data_dir / "PG_VERSION").exists()

        with embedded_postgres(data_dir) as server:
            assert server.pid != first_pid
            assert server_answers(server.url("kept"))
            second_pid = server.pid
        assert not alive(second_pid)
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_nested_blocks_on_one_data_dir_share_the_server() -> None:
    parent = Path(tempfile.mkdtemp(prefix="sct-embedded-test-"))
    try:
        with embedded_postgres(parent / "pg") as outer:
            with embedded_postgres(parent / "pg") as inner:
                assert inner.pid == outer.pid
            # Leaving the inner block must not stop the server under the outer one.
            assert server_answers(outer.admin_url)
        assert not alive(outer.pid)
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_restart_after_stale_handle_gets_a_fresh_server() -> None:
    parent = Path(tempfile.mkdtemp(prefix="sct-embedded-test-"))
    try:
        with embedded_postgres(parent / "pg") as first:
            handles = first.data_dir / ".handle_pids.json"
            handles.write_text(json.dumps([*json.loads(handles.read_text()), 2**22 + 1]))
        assert not alive(first.pid)
        # pgserver caches a server object per directory; a stale one would report the old pid.
        with embedded_postgres(parent / "pg") as second:
            assert second.pid != first.pid
            assert server_answers(second.admin_url)
        assert not alive(second.pid)
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_create_database_validates_the_name() -> None:
    with embedded_postgres() as server, pytest.raises(ValueError, match="not a plain identifier"):
        server.create_database('x"; DROP DATABASE postgres; --')


def test_server_answers_false_when_nothing_listens(tmp_path: Path) -> None:
    assert not server_answers(f"postgresql://postgres@/postgres?host={tmp_path}", timeout=1)
    with pytest.raises(ValueError, match="postgresql://"):
        server_answers("mysql://u:pw@localhost/db")


def test_importing_the_module_does_not_import_pgserver() -> None:
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    code = (
        "import sys\n"
        "import session_cleanup_dev.embedded as e\n"
        "assert 'pgserver' not in sys.modules, 'imported eagerly'\n"
        "e._import_pgserver()\n"
        "assert 'pgserver' in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "XDG_RUNTIME_DIR" not in result.stderr
