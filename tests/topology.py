"""Production topology for tests: a real PgBouncer in front of a server, a real streaming replica.

- :func:`pgbouncer` runs Debian's ``pgbouncer`` (``./run test`` installs it) on a free
  loopback port in front of the suite's server, in session or transaction pooling mode.
- :func:`replica_pair` runs a primary (the embedded PostgreSQL 16) and a hot standby made
  from it with ``pg_basebackup -R``, streaming over unix sockets, with the same binaries.

Both are private to the test that starts them, live in temporary directories, and are stopped
and removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

from session_cleanup_dagster.urls import psycopg_url
from tests import pg
from tests.stack import free_port, wait_for

PGBOUNCER = Path("/usr/sbin/pgbouncer")


def _as_root() -> bool:
    return os.geteuid() == 0


@contextmanager
def pgbouncer(admin_url: str, mode: str) -> Iterator[str]:
    """PgBouncer in ``mode`` (session or transaction) in front of ``admin_url``'s server.

    Yields the admin URL through the pooler (user postgres, database postgres); any database
    of the server is reachable through it under its own name.
    """
    assert PGBOUNCER.exists(), "pgbouncer is missing: ./run test installs Debian's package"
    target = psycopg_url(admin_url)
    host = target.host or str(target.query.get("host", ""))
    port = target.port or int(str(target.query.get("port", "5432")))
    user = target.username or "postgres"
    home = Path(tempfile.mkdtemp(prefix="session-cleanup-pgbouncer-"))
    listen = free_port()
    (home / "users.txt").write_text(f'"{user}" ""\n')
    (home / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={host} port={port}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {listen}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {home / 'users.txt'}\n"
        f"pool_mode = {mode}\n"
        "max_client_conn = 200\n"
        "default_pool_size = 20\n"
        f"logfile = {home / 'pgbouncer.log'}\n"
        f"pidfile = {home / 'pgbouncer.pid'}\n"
    )
    command = [str(PGBOUNCER), str(home / "pgbouncer.ini")]
    if _as_root():
        # PgBouncer refuses to run as root; the embedded server's user serves it as well.
        shutil.chown(home, "pgserver", "pgserver")
        for entry in home.iterdir():
            shutil.chown(entry, "pgserver", "pgserver")
        command[1:1] = ["-u", "pgserver"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = pg.as_role(
        psycopg_url(admin_url)
        .set(host="127.0.0.1", port=listen, query={}, database="postgres")
        .render_as_string(hide_password=False),
        user,
        target.password,
    )
    try:
        wait_for("pgbouncer to accept connections", lambda: _answers(url), 30)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(home, ignore_errors=True)


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2, prepare_threshold=None) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


@dataclass(frozen=True)
class ReplicaPair:
    """A primary and a streaming hot standby, both superuser-trusting, over unix sockets."""

    primary_url: str  # admin URL (database postgres) of the primary
    standby_url: str  # the same for the standby

    def pause_replay(self) -> None:
        pg.execute(self.standby_url, "SELECT pg_wal_replay_pause()")

    def resume_replay(self) -> None:
        pg.execute(self.standby_url, "SELECT pg_wal_replay_resume()")

    def wait_caught_up(self, within_bytes: int = 0, timeout: float = 120) -> None:
        """Until the standby has replayed all but ``within_bytes`` of the primary's WAL.

        A tolerance helps when the primary keeps writing (autovacuum on a fresh copy).
        """

        def caught_up() -> bool:
            with psycopg.connect(self.primary_url, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE"
                    " pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn) <= %s), count(*)"
                    " FROM pg_stat_replication",
                    (within_bytes,),
                ).fetchone()
            return row is not None and row[1] > 0 and row[0] == row[1]

        wait_for("the standby to catch up", caught_up, timeout)


@contextmanager
def replica_pair() -> Iterator[ReplicaPair]:
    """Start a primary and a standby of it; stop both and remove their files afterwards."""
    from session_cleanup_dev.embedded import embedded_postgres

    with embedded_postgres() as primary:
        bin_dir = _bin_dir()
        root = Path(tempfile.mkdtemp(prefix="session-cleanup-standby-"))
        root.chmod(0o755)
        if _as_root():
            shutil.chown(root, "pgserver", "pgserver")
        data_dir = root / "pgdata"
        log = root / "log"
        port = free_port()
        user = "pgserver" if _as_root() else None
        try:
            subprocess.run(
                [
                    *(str(bin_dir / "pg_basebackup"), "-D", str(data_dir), "-R", "-X", "stream"),
                    *("-h", str(primary.socket_dir), "-p", str(primary.port), "-U", "postgres"),
                ],
                check=True,
                user=user,
                capture_output=True,
                timeout=120,
            )
            options = f"-p {port} -k {root} -c listen_addresses='' -c hot_standby=on"
            subprocess.run(
                [
                    *(str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-o", options),
                    *("-l", str(log), "-w", "start"),
                ],
                check=True,
                user=user,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=120,
            )
            standby_url = (
                psycopg_url(primary.admin_url)
                .set(query={"host": str(root), "port": str(port)}, drivername="postgresql")
                .render_as_string(hide_password=False)
            )
            pair = ReplicaPair(primary_url=primary.admin_url, standby_url=standby_url)
            pair.wait_caught_up()
            yield pair
        finally:
            if (data_dir / "postmaster.pid").exists():
                subprocess.run(
                    [str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-m", "immediate", "-w", "stop"],
                    user=user,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=120,
                    check=False,
                )
            shutil.rmtree(root, ignore_errors=True)


def _bin_dir() -> Path:
    from session_cleanup_dev.embedded import _import_pgserver

    return Path(_import_pgserver().postgres_server.POSTGRES_BIN_PATH)
