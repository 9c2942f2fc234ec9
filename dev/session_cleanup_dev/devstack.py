"""``session-cleanup dev``: webserver, daemon and code location from one command.

``dagster dev`` works from the checkout too (on the root dagster.yaml, SQLite storage); this
command runs the production instance and shuts down in order. A signal to ``dagster dev``
alone leaves its code server and run worker going (the run finished SUCCESS after the
operator shut down), a signal to its whole process group fails the run (and run_retries
re-runs it on the next start), and started in the background from a script it ignored
SIGTERM. Here ``dagster-webserver`` and
``dagster-daemon`` are two children, each in a process group of its own (stack.py, which the
tests' stack uses too), so a Ctrl-C in the terminal reaches only this process, which then
shuts down in order:

1. ask Dagster (GraphQL ``terminateRuns``) to terminate every queued and in-flight run, and
   wait, within a bound, until each is CANCELED;
2. stop the daemon's process group (daemon, its code server, any run worker) and the
   webserver's; SIGKILL whatever is left after a bound;
3. stop the embedded PostgreSQL and remove the temporary directory.

Without ``APP_DATABASE_URL`` or ``DAGSTER_PG_URL`` an embedded PostgreSQL serves both (two
databases), and the app database is seeded with demo data, so the production instance,
deploy/dagster.yaml (Postgres storage), is what runs locally.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import requests
from dagster_graphql import DagsterGraphQLClientError

from session_cleanup_dagster.resources import make_engine
from session_cleanup_dev.embedded import embedded_postgres
from session_cleanup_dev.seed import seed_database
from session_cleanup_dev.stack import Echo, ProcessGroups, dagster_commands
from session_cleanup_dev.webserver import Webserver

# The production instance (Postgres storage): what this stack runs, on the embedded server.
INSTANCE = Path("deploy/dagster.yaml")
IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]
READY_TIMEOUT_S = 180.0


class Shutdown(Exception):
    """A signal asked the stack to stop."""


@dataclass(frozen=True)
class DevOptions:
    """What ``session-cleanup dev`` was asked for."""

    host: str = "127.0.0.1"
    port: int = 3000
    project_dir: Path | None = None
    users: int = 2000
    cancel_timeout_s: float = 30.0


def project_dir(given: Path | None) -> Path:
    """Where deploy/dagster.yaml and workspace.yaml are: given, else this checkout, else the cwd."""
    candidates = [given] if given else [Path(__file__).resolve().parents[2], Path.cwd()]
    for candidate in candidates:
        if candidate and (candidate / INSTANCE).is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"no {INSTANCE} found; run from the repository or pass --project-dir")


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _install_signal_handlers() -> None:
    """Obey SIGTERM, SIGINT and SIGHUP even if started with them ignored.

    A shell starts background jobs with SIGINT ignored, and an ignored signal stays ignored
    across exec: without this, our children (and so the run workers, which Dagster stops
    with SIGINT) would ignore it too. A handled signal is reset to the default in children.
    """

    def handler(signum: int, frame: object) -> None:
        raise Shutdown(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, handler)


def _ignore_signals() -> None:
    """While shutting down, a second Ctrl-C must not cut the orderly shutdown short."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


@contextmanager
def _databases(users: int, echo: Echo) -> Iterator[tuple[str, str]]:
    """The app and storage URLs: from the environment, or an embedded server for the rest."""
    app_url = os.environ.get("APP_DATABASE_URL", "").strip()
    storage_url = os.environ.get("DAGSTER_PG_URL", "").strip()
    if app_url and storage_url:
        echo("Using APP_DATABASE_URL and DAGSTER_PG_URL from the environment.")
        yield app_url, storage_url
        return
    with embedded_postgres() as server:
        echo(f"Embedded PostgreSQL 16 started (pid {server.pid}).")
        if not storage_url:
            storage_url = server.create_database("dagster")
            echo("Run storage: embedded database 'dagster'.")
        if not app_url:
            app_url = server.create_database("app")
            engine = make_engine(app_url)
            try:
                counts = seed_database(engine, users)
            finally:
                engine.dispose()
            echo(
                "App database: embedded database 'app', seeded with "
                + ", ".join(f"{n} {t}" for t, n in counts.items())
                + "."
            )
        yield app_url, storage_url
    echo("Embedded PostgreSQL stopped and removed.")


def _ready(webserver: Webserver) -> str | None:
    """None when the code location is loaded and the daemons are healthy; else why not."""
    try:
        return webserver.not_ready()
    except (OSError, requests.RequestException, DagsterGraphQLClientError) as exc:
        return f"webserver not answering ({type(exc).__name__})"


def _terminate_runs(
    webserver: Webserver, instance: dg.DagsterInstance, timeout_s: float, echo: Echo
) -> None:
    """Terminate every queued and in-flight run, and wait until none is left (bounded)."""
    started = time.monotonic()
    deadline = started + timeout_s
    asked: set[str] = set()
    while True:
        runs = instance.get_runs(dg.RunsFilter(statuses=IN_FLIGHT))
        if not runs:
            break
        new = [
            r.run_id
            for r in runs
            if r.run_id not in asked and r.status != dg.DagsterRunStatus.CANCELING
        ]
        if new:
            echo(f"Terminating {len(new)} run(s): {', '.join(new)}")
            with suppress(DagsterGraphQLClientError):  # a run that ended meanwhile
                webserver.client.terminate_runs(new)
            asked.update(new)
        if time.monotonic() >= deadline:
            echo(
                f"{len(runs)} run(s) not CANCELED after {timeout_s:.0f} s: "
                + ", ".join(f"{r.run_id} {r.status.value}" for r in runs)
                + ". Stopping anyway; a run left STARTED is failed by the stuck-run sensor on "
                "the next start, and every committed batch is complete."
            )
            return
        time.sleep(0.2)
    took = time.monotonic() - started
    for run_id in sorted(asked):
        run = instance.get_run_by_id(run_id)
        status = run.status.value if run else "gone"
        echo(f"Run {run_id}: {status} (all done {took:.1f} s after asking)")


def run_dev(options: DevOptions, echo: Echo) -> int:
    """Run the stack until a signal; return the exit code."""
    _install_signal_handlers()
    project = project_dir(options.project_dir)
    bin_dir = Path(sys.executable).parent
    port = options.port or _free_port(options.host)
    temp = Path(tempfile.mkdtemp(prefix="session-cleanup-dev-"))
    code = 0
    try:
        code = _run(options, project, bin_dir, port, temp, echo)
    except Shutdown as exc:
        # A signal before the stack was up: the context managers stopped what had started.
        echo(f"{exc}: stopped during start-up.")
    finally:
        _ignore_signals()
        shutil.rmtree(temp, ignore_errors=True)
    echo("Stopped; nothing left running.")
    return code


def _run(
    options: DevOptions, project: Path, bin_dir: Path, port: int, temp: Path, echo: Echo
) -> int:
    code = 0
    webserver = Webserver(options.host, port)
    with ExitStack() as stack:
        app_url, storage_url = stack.enter_context(_databases(options.users, echo))
        home = temp / "dagster_home"
        home.mkdir()
        shutil.copy(project / INSTANCE, home / "dagster.yaml")
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "APP_DATABASE_URL": app_url,
            "DAGSTER_PG_URL": storage_url,
        }
        # Our own instance (to list runs at shutdown) reads the same settings.
        os.environ.update({"DAGSTER_HOME": str(home), "DAGSTER_PG_URL": storage_url})
        instance = stack.enter_context(dg.DagsterInstance.from_config(str(home)))
        # The children's output goes to the terminal, as with `dagster dev`.
        children = ProcessGroups(env, project)
        commands = dagster_commands(bin_dir, project / "workspace.yaml", options.host, port)
        try:
            for name, command in commands.items():
                children.start(name, command)
            code = _serve(webserver, children, echo)
        except Shutdown as exc:
            echo(f"{exc}: shutting down.")
        finally:
            _ignore_signals()
            if "webserver" in children.procs and children.procs["webserver"].poll() is None:
                try:
                    _terminate_runs(webserver, instance, options.cancel_timeout_s, echo)
                except (OSError, requests.RequestException, DagsterGraphQLClientError) as exc:
                    echo(f"Could not terminate runs through the webserver: {exc}")
            # The runs are CANCELED by now, so both can go at once; the daemon first, so it
            # launches nothing more.
            children.stop(["daemon", "webserver"], echo)
    return code


def _serve(webserver: Webserver, children: ProcessGroups, echo: Echo) -> int:
    deadline = time.monotonic() + READY_TIMEOUT_S
    reason: str | None = "starting"
    while reason is not None:
        if (exited := children.exited()) is not None:
            echo(f"{exited} during start-up.")
            return 1
        if time.monotonic() > deadline:
            echo(f"not ready after {READY_TIMEOUT_S:.0f} s: {reason}")
            return 1
        time.sleep(0.5)
        reason = _ready(webserver)
    echo(f"Dagster UI: {webserver.url}  (ready; Ctrl-C or SIGTERM stops everything)")
    while (exited := children.exited()) is None:
        time.sleep(1.0)
    echo(f"{exited}; stopping the rest.")
    return 1
