"""An embedded PostgreSQL server for machines without one, built on the ``pgserver`` wheel.

``pgserver`` bundles PostgreSQL 16 binaries, runs ``initdb`` and ``pg_ctl`` for us and listens
on a unix socket only (no TCP port, so it cannot clash with a system server). Things worth
knowing about it, all handled or documented here:

* It is imported lazily: importing it evaluates ``platformdirs.user_runtime_path()`` at class
  definition time, which warns when ``XDG_RUNTIME_DIR`` is unset (common in containers and
  CI). That warning is silenced for the import only, so it neither leaks into unrelated code
  nor trips ``pytest -W error``.
* As root it creates (if needed) and runs the server as a system user ``pgserver``, chowns the
  data directory to it and adds group/other read+execute permission to *every ancestor* of the
  data directory and to its own binaries. Prefer a data directory under a world-readable
  parent such as the default temp dir; a path under ``/root`` would open ``/root`` up.
* ``cleanup_mode`` (``"stop"``, ``"delete"`` or ``None``) decides what happens when the last
  handle goes away: stop the server, stop it and ``rmtree`` the data directory, or leave it
  running. "Last handle" is tracked per data directory in ``.handle_pids.json`` across
  processes, plus an ``atexit`` hook in each process. A stale pid left there by a killed
  process makes ``pgserver`` believe the server is still shared and *not* stop it, so
  :func:`embedded_postgres` checks ``postmaster.pid`` afterwards and stops a server left
  running itself (always for a throwaway directory; for an explicit one only when no other
  live process is listed).
* If the data directory path is too long for a unix socket, the socket goes into a hashed
  directory under the user runtime dir instead, which is not removed afterwards.
* ``pg_ctl`` daemonises the postmaster, so once stopped it is reaped by init. Under an init
  that reaps lazily (some container runtimes) it lingers as a ``<defunct>`` zombie for a
  while; it is not running, and the checks here treat it as gone.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from session_cleanup_dagster.schema import quoted_identifier, validate_identifier
from session_cleanup_dagster.urls import psycopg_url

if TYPE_CHECKING:
    from pgserver.postgres_server import PostgresServer

__all__ = ["EmbeddedPostgres", "embedded_postgres", "server_answers"]

_logger = logging.getLogger(__name__)

# pgserver always initialises the cluster with this superuser and trust authentication.
_SUPERUSER = "postgres"
_STOP_TIMEOUT_S = 60


@dataclass(frozen=True)
class EmbeddedPostgres:
    """A running embedded server, as handed out by :func:`embedded_postgres`.

    Attributes:
        admin_url: ``postgresql://`` URL of the ``postgres`` database, over the unix socket.
        data_dir: The server's data directory (``PGDATA``).
        socket_dir: The directory holding the server's unix socket.
        port: The port number in the socket's name (no TCP port is opened).
        pid: Process id of the postmaster.
    """

    admin_url: str
    data_dir: Path
    socket_dir: Path
    port: int
    pid: int

    def url(self, dbname: str) -> str:
        """Return the ``postgresql://`` URL of database ``dbname`` on this server.

        Args:
            dbname: The database name.

        Returns:
            A libpq-style URL that psycopg accepts directly and :func:`psycopg_url` converts
            for SQLAlchemy.
        """
        return _socket_url(self.socket_dir, self.port, dbname)

    def create_database(self, name: str) -> str:
        """Create database ``name`` on this server and return its URL.

        Args:
            name: The new database's name; must be a valid lower-case identifier.

        Returns:
            The database's ``postgresql://`` URL.

        Raises:
            ValueError: If ``name`` is not a valid identifier.
            sqlalchemy.exc.DBAPIError: If the database cannot be created, e.g. it exists.
        """
        validate_identifier(name)
        # CREATE DATABASE cannot run inside a transaction block, hence AUTOCOMMIT; NullPool so
        # no connection outlives this call and blocks a later DROP DATABASE.
        engine = sa.create_engine(
            psycopg_url(self.admin_url), isolation_level="AUTOCOMMIT", poolclass=NullPool
        )
        try:
            with engine.connect() as conn:
                conn.execute(sa.text(f"CREATE DATABASE {quoted_identifier(conn, name)}"))
        finally:
            engine.dispose()
        return self.url(name)


def _socket_url(socket_dir: Path, port: int, dbname: str) -> str:
    """Build a ``postgresql://`` URL for a unix-socket server (see :meth:`EmbeddedPostgres.url`)."""
    # The port goes in explicitly so a PGPORT in the environment cannot redirect libpq.
    return (
        f"postgresql://{_SUPERUSER}@/{quote(dbname, safe='')}"
        f"?host={quote(str(socket_dir), safe='/')}&port={port}"
    )


def _import_pgserver() -> ModuleType:
    """Import ``pgserver`` with its import-time ``XDG_RUNTIME_DIR`` warning silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR", category=UserWarning)
        import pgserver

    return pgserver


def _pg_ctl(pgserver: ModuleType, data_dir: Path, user: str | None, *args: str) -> int:
    """Run the bundled ``pg_ctl`` on ``data_dir`` as ``user`` and return its exit code."""
    # POSTGRES_BIN_PATH is not re-exported by the package, only by its submodules.
    bin_dir = Path(pgserver.postgres_server.POSTGRES_BIN_PATH)
    command = [str(bin_dir / "pg_ctl"), "-D", str(data_dir), *args]
    # Output goes to DEVNULL rather than pipes: a server started by pg_ctl inherits them and
    # would keep a pipe reader waiting (pgserver works around the same problem). The command
    # is the wheel's own binary with fixed arguments, so S603's untrusted-input worry is moot.
    result = subprocess.run(  # noqa: S603
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        user=user,
        timeout=_STOP_TIMEOUT_S + 10,
        check=False,
    )
    return result.returncode


def _process_alive(pid: int) -> bool:
    """Tell whether process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # It exists but belongs to another user (the server runs as "pgserver" for root).
    # A stopped postmaster whose parent has not reaped it yet (e.g. a container init that
    # reaps lazily) still answers kill(pid, 0); it is dead all the same.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # No procfs (not Linux): trust kill().
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


def _postmaster_pid(data_dir: Path) -> int | None:
    """Return the pid recorded in ``postmaster.pid`` if that process is alive, else None."""
    try:
        first_line = (data_dir / "postmaster.pid").read_text().splitlines()[0]
        pid = int(first_line.strip())
    except (OSError, IndexError, ValueError):
        return None
    return pid if _process_alive(pid) else None


def _live_other_handles(data_dir: Path) -> list[int]:
    """Return pids, other than ours, that pgserver lists as using ``data_dir`` and that live."""
    try:
        pids = [int(pid) for pid in json.loads((data_dir / ".handle_pids.json").read_text())]
    except (OSError, ValueError, TypeError):
        return []
    return [pid for pid in pids if pid != os.getpid() and _process_alive(pid)]


def _ensure_stopped(pgserver: ModuleType, data_dir: Path, user: str | None, *, force: bool) -> None:
    """Stop the server in ``data_dir`` if pgserver left it running.

    Args:
        pgserver: The imported ``pgserver`` module (for its ``pg_ctl``).
        data_dir: The server's data directory.
        user: OS user to run ``pg_ctl`` as (``None``: ourselves).
        force: Stop it even if pgserver lists other live processes as using it (true for a
            throwaway directory, which nobody else can legitimately be using).

    Raises:
        RuntimeError: If the server is still running after an immediate shutdown.
    """
    pid = _postmaster_pid(data_dir)
    if pid is None:
        return
    others = _live_other_handles(data_dir)
    if others and not force:
        _logger.warning(
            "embedded PostgreSQL in %s left running: still used by processes %s", data_dir, others
        )
        return
    _logger.info("stopping embedded PostgreSQL (pid %s) in %s", pid, data_dir)
    # Fast shutdown rolls back open transactions instead of waiting for clients to leave;
    # immediate shutdown is the fallback for a server that does not finish in time.
    code = _pg_ctl(pgserver, data_dir, user, "stop", "-m", "fast", "-w", "-t", str(_STOP_TIMEOUT_S))
    if code != 0 and _process_alive(pid):
        _pg_ctl(pgserver, data_dir, user, "stop", "-m", "immediate", "-w")
    if _process_alive(pid):
        raise RuntimeError(f"could not stop embedded PostgreSQL (pid {pid}) in {data_dir}")


# How many embedded_postgres() blocks of this process use each data directory, so a nested
# block on the same directory does not stop the server under the outer one.
_in_use: dict[Path, int] = {}


def _forget(pgserver: ModuleType, data_dir: Path, server: PostgresServer) -> None:
    """Drop pgserver's per-process references to a server we are done with."""
    # Without this the atexit hook keeps the object alive for the rest of the process and
    # re-runs a now pointless cleanup at exit.
    atexit.unregister(server._cleanup)
    # pgserver caches one object per data directory and only evicts it when it stops the
    # server itself; a cached object for a server we stopped would make the next
    # get_server() on this directory hand back stale connection details.
    instances = pgserver.postgres_server.PostgresServer._instances
    if instances.get(data_dir) is server:
        del instances[data_dir]


def _system_user() -> str | None:
    """The OS user pgserver runs the server as: ``pgserver`` for root, else ourselves."""
    return "pgserver" if hasattr(os, "geteuid") and os.geteuid() == 0 else None


@contextmanager
def embedded_postgres(data_dir: Path | None = None) -> Iterator[EmbeddedPostgres]:
    """Run an embedded PostgreSQL 16 server for the duration of the ``with`` block.

    The server is stopped when the block exits, also on exceptions. With ``data_dir=None`` it
    lives in a fresh temporary directory that is removed afterwards; an explicit ``data_dir``
    is initialised if empty (or reused if it already holds a cluster) and kept.

    Args:
        data_dir: Data directory to use; its parent must exist. ``None`` for a throwaway one.

    Yields:
        The running server's connection details.

    Raises:
        FileNotFoundError: If the parent of ``data_dir`` does not exist.
        subprocess.CalledProcessError: If ``initdb`` or ``pg_ctl start`` fails (the server log
            is in ``<data_dir>/log``).
    """
    pgserver = _import_pgserver()
    temp_root: Path | None = None
    if data_dir is None:
        temp_root = Path(tempfile.mkdtemp(prefix="session-cleanup-pg-")).resolve()
        # A subdirectory, because pgserver chowns the data directory to its system user and
        # initdb wants it private; the temp root stays ours and is what we remove.
        pgdata = temp_root / "pgdata"
    else:
        pgdata = Path(data_dir).expanduser().resolve()
    user = _system_user()
    stopped = False
    try:
        server: PostgresServer | None = None
        try:
            # "stop", not "delete": we remove the temp root ourselves and must never delete a
            # caller's data directory.
            server = pgserver.get_server(pgdata, cleanup_mode="stop")
            _in_use[pgdata] = _in_use.get(pgdata, 0) + 1
            with server:
                info = server.get_postmaster_info()
                if info.socket_dir is None or info.port is None:
                    raise RuntimeError(f"embedded PostgreSQL in {pgdata} reports no unix socket")
                socket_dir, port = Path(info.socket_dir), int(info.port)
                yield EmbeddedPostgres(
                    admin_url=_socket_url(socket_dir, port, "postgres"),
                    data_dir=pgdata,
                    socket_dir=socket_dir,
                    port=port,
                    pid=int(info.pid),
                )
        finally:
            if server is not None:
                _in_use[pgdata] -= 1
            if _in_use.get(pgdata, 0) > 0:
                # An enclosing embedded_postgres() on the same directory still uses the server.
                stopped = True
            else:
                _in_use.pop(pgdata, None)
                if server is not None:
                    _forget(pgserver, pgdata, server)
                # pgserver's own cleanup skips the stop when its handle list holds a stale pid
                # (left by a killed process), and nothing stops a postmaster launched by a
                # start that then failed or timed out; check for both.
                _ensure_stopped(pgserver, pgdata, user, force=temp_root is not None)
                stopped = True
    finally:
        if temp_root is not None:
            if stopped:
                shutil.rmtree(temp_root, ignore_errors=True)
            else:
                # Deleting the files of a live server would only hide it; leave the evidence.
                _logger.error("embedded PostgreSQL still running; keeping %s", temp_root)


def server_answers(url: str, timeout: float = 2.0) -> bool:
    """Tell whether a PostgreSQL server accepts a connection at ``url``.

    Args:
        url: A ``postgresql://``, ``postgres://`` or ``postgresql+psycopg://`` URL.
        timeout: Connection timeout in seconds. libpq counts whole seconds with a minimum of
            2, so smaller values wait up to 2 seconds.

    Returns:
        True if a connection could be opened and ``SELECT 1`` ran, False otherwise.

    Raises:
        ValueError: If ``url`` is not a PostgreSQL URL (that is a bug, not an outage).
    """
    import psycopg

    psycopg_url(url)  # Validates the scheme; raises ValueError without leaking the password.
    # libpq understands postgresql:// and postgres:// but not SQLAlchemy's "+driver" suffix.
    conninfo = "postgresql://" + url.split("://", 1)[1]
    try:
        with psycopg.connect(conninfo, connect_timeout=max(1, math.ceil(timeout))) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        _logger.debug("PostgreSQL server does not answer: %s", exc)
        return False
    return True
