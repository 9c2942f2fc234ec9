"""A real Dagster stack for tests: dagster-daemon and dagster-webserver as separate processes.

The one harness behind the operations, deployment, dev and browser tests.

They run with the production instance, deploy/dagster.yaml (copied into a temporary
DAGSTER_HOME), and workspace.yaml, against Postgres run storage in a scratch database, and are
driven through ``DagsterGraphQLClient`` (session_cleanup_dev.webserver, the dev stack's path
too), as an operator's tools drive them. The processes are session_cleanup_dev.stack's
process groups, as in ``session-cleanup dev``: stopping (or SIGKILLing) a group also takes
its code server and any run worker with it, and ``stop`` checks nothing of the group is left.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import requests
from dagster_graphql import DagsterGraphQLClientError
from session_cleanup_dev.stack import ProcessGroups, dagster_commands
from session_cleanup_dev.webserver import LOCATION, Webserver

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
JOB = "session_cleanup_job"
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(what: str, predicate: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    """Poll until ``predicate`` returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (requests.RequestException, OSError, DagsterGraphQLClientError) as exc:
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} ({last_error})")


def stop_group(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30
) -> None:
    """Signal a process group, wait for its leader, then make sure the whole group is gone."""
    groups = ProcessGroups({}, REPO)
    groups.procs["process"] = proc
    groups.stop(["process"], lambda _: None, sig, timeout_s=timeout)


@dataclass
class Stack:
    """A running daemon + webserver pair; see :func:`running_stack`."""

    home: Path
    env: dict[str, str]
    port: int = 0
    groups: ProcessGroups = field(default_factory=lambda: ProcessGroups({}, REPO))
    _webserver: Webserver | None = None

    def start(self) -> None:
        self.port = free_port()
        self.groups = ProcessGroups(self.env, REPO)
        commands = dagster_commands(BIN, REPO / "workspace.yaml", "127.0.0.1", self.port)
        for name, command in commands.items():
            with (self.home / f"{name}.log").open("ab") as log:
                self.groups.start(name, command, log)
        wait_for("the webserver and daemons to be ready", self.ready, 180, interval=0.5)

    def ready(self) -> bool:
        return self.webserver.not_ready() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.groups.stop(["daemon", "webserver"], lambda _: None, sig, timeout_s=30)

    def kill(self) -> None:
        """SIGKILL both process groups at once: a crash of the whole stack."""
        self.groups.kill()

    def log_text(self) -> str:
        return "\n".join(
            (self.home / f"{n}.log").read_text(errors="replace")
            for n in ("daemon", "webserver")
            if (self.home / f"{n}.log").exists()
        )

    # --- GraphQL ---------------------------------------------------------------------------

    @property
    def webserver(self) -> Webserver:
        """The client for the current port (a restarted stack listens on a new one)."""
        if self._webserver is None or self._webserver.port != self.port:
            self._webserver = Webserver("127.0.0.1", self.port)
        return self._webserver

    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.webserver.query(query, variables)

    def submit(
        self,
        *,
        partition: str | None = None,
        op_config: dict[str, Any] | None = None,
        resources: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
        op_selection: list[str] | None = None,
        per_op: dict[str, dict[str, Any]] | None = None,
        job: str = JOB,
        job_config: dict[str, Any] | None = None,
    ) -> str:
        """Launch a run; ``job_config`` is the whole run config of a job with a config mapping."""
        ops = op_selection or ["expire_sessions", "purge_declines", "remove_orphan_fingerprints"]
        run_config: dict[str, Any] = {
            "ops": {
                op: {"config": {**(op_config or {}), **(per_op or {}).get(op, {})}} for op in ops
            }
        }
        if job_config is not None:
            run_config = dict(job_config)
        if resources:
            run_config["resources"] = {
                "app_db": {"config": {"url": {"env": "APP_DATABASE_URL"}, **resources}}
            }
        all_tags = dict(tags or {})
        if partition:
            all_tags["dagster/partition"] = partition
        return str(
            self.webserver.client.submit_job_execution(
                job,
                repository_location_name=LOCATION,
                repository_name="__repository__",
                run_config=run_config,
                tags=all_tags,
                op_selection=op_selection,
            )
        )

    def status(self, run_id: str) -> str:
        return str(self.webserver.client.get_run_status(run_id).value)

    def wait_status(self, run_id: str, statuses: set[str], timeout: float = 120) -> str:
        return str(
            wait_for(
                f"run {run_id} to reach {statuses}",
                lambda: (s := self.status(run_id)) in statuses and s,
                timeout,
                interval=0.1,
            )
        )

    def terminate(self, run_id: str) -> None:
        self.webserver.client.terminate_run(run_id)

    def runs(self, job: str = JOB) -> list[dict[str, Any]]:
        """The job's runs, newest first."""
        data = self.graphql(
            """query($job: String!) { runsOrError(filter: {pipelineName: $job}) { ... on Runs {
                 results { runId status rootRunId parentRunId startTime endTime
                           tags { key value } } } } }""",
            {"job": job},
        )
        return list(data["runsOrError"]["results"])

    def wait_for_runs(self, job: str, count: int, timeout: float = 180.0) -> list[dict[str, Any]]:
        """Wait until ``job`` has ``count`` finished runs; return the finished ones."""
        return list(
            wait_for(
                f"{count} finished runs of {job}",
                lambda: (
                    len(done := [r for r in self.runs(job) if r["status"] in TERMINAL]) >= count
                    and done
                ),
                timeout,
                interval=1.0,
            )
        )

    def wait_for_backfills(self, timeout: float = 180.0) -> list[str]:
        """Wait until every backfill has completed (the daemon marks it); return statuses."""

        def completed() -> list[str]:
            data = self.graphql(
                "{ partitionBackfillsOrError { ... on PartitionBackfills { results { status } } } }"
            )
            statuses = [b["status"] for b in data["partitionBackfillsOrError"]["results"]]
            done = statuses and all(s.startswith("COMPLETED") for s in statuses)
            return statuses if done else []

        return list(wait_for("every backfill to complete", completed, timeout, interval=1.0))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def dagster_home(env: dict[str, str]) -> Iterator[Path]:
    """A temporary DAGSTER_HOME holding the production instance file; removed afterwards."""
    home = Path(tempfile.mkdtemp(prefix="session-cleanup-stack-"))
    try:
        shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
        env["DAGSTER_HOME"] = str(home)
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


@contextmanager
def running_stack(env: dict[str, str], home: Path) -> Iterator[Stack]:
    """Start daemon and webserver with ``env``; stop both (and check) on the way out."""
    stack = Stack(home=home, env=env)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def instance(env: dict[str, str]) -> dg.DagsterInstance:
    """The stack's instance, from the test process (to read runs and events)."""
    os.environ["DAGSTER_PG_URL"] = env["DAGSTER_PG_URL"]
    return dg.DagsterInstance.from_config(env["DAGSTER_HOME"])


class AlertServer:
    """A local HTTP server that records every JSON body POSTed to it (the alert webhook)."""

    def __init__(self) -> None:
        import http.server
        import json
        import threading

        received: list[dict[str, Any]] = []
        self.received = received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def texts(self) -> list[str]:
        return [str(body.get("text", "")) for body in list(self.received)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def worker_pid(inst: dg.DagsterInstance, run_id: str) -> int:
    """The run worker's pid, from the run's "Started process for run (pid: N)." event."""
    import re

    for entry in inst.all_logs(run_id):
        match = re.search(r"Started process for run \(pid: (\d+)\)", entry.message or "")
        if match:
            return int(match.group(1))
    raise AssertionError(f"no run worker pid logged for {run_id}")
