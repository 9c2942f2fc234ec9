"""A real Dagster stack for the browser tests: dagster-webserver and dagster-daemon.

Both run as subprocesses of the test, in their own process group, on a temporary
DAGSTER_HOME whose dagster.yaml keeps run and event storage in a scratch PostgreSQL database
(as in production; the repo's dagster.yaml is not used). The webserver binds a free port on
127.0.0.1. ``ui_stack`` stops both groups (SIGTERM, then SIGKILL after a bound) and removes
the home directory, also when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

DAGSTER_YAML = """\
storage:
  postgres:
    postgres_url:
      env: DAGSTER_PG_URL
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
telemetry:
  enabled: false
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Stack:
    """A running stack: its UI address and a GraphQL client."""

    url: str
    home: Path
    logs: Path

    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(
            f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            answer: dict[str, Any] = json.loads(response.read())
        if answer.get("errors"):
            raise AssertionError(f"GraphQL errors: {answer['errors']}")
        return answer["data"]  # type: ignore[no-any-return]

    def runs(self, job: str) -> list[dict[str, Any]]:
        """The job's runs, newest first: id, status, tags."""
        data = self.graphql(
            """query Runs($job: String!) {
              runsOrError(filter: {pipelineName: $job}) {
                ... on Runs { results { runId status tags { key value } } }
              }
            }""",
            {"job": job},
        )
        return data["runsOrError"]["results"]  # type: ignore[no-any-return]

    def wait_for_runs(self, job: str, count: int, timeout: float = 180.0) -> list[dict[str, Any]]:
        """Wait until ``job`` has ``count`` finished runs; return them."""
        deadline = time.monotonic() + timeout
        while True:
            runs = self.runs(job)
            done = [r for r in runs if r["status"] in ("SUCCESS", "FAILURE", "CANCELED")]
            if len(done) >= count:
                return done
            if time.monotonic() > deadline:
                raise AssertionError(f"{job}: runs {runs} not finished after {timeout} s")
            time.sleep(1.0)

    def wait_for_backfills(self, timeout: float = 180.0) -> list[str]:
        """Wait until every backfill has completed (the daemon marks it); return statuses."""
        deadline = time.monotonic() + timeout
        while True:
            data = self.graphql(
                "{ partitionBackfillsOrError { ... on PartitionBackfills { results { status } } } }"
            )
            statuses = [b["status"] for b in data["partitionBackfillsOrError"]["results"]]
            if statuses and all(status.startswith("COMPLETED") for status in statuses):
                return statuses
            if time.monotonic() > deadline:
                raise AssertionError(f"backfills {statuses} not completed after {timeout} s")
            time.sleep(1.0)

    def daemon_log(self) -> str:
        return (self.logs / "daemon.log").read_text(errors="replace")


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            args,
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: we stop it and its children
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    # Run workers and code servers the group started may outlive its leader briefly.
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _wait_for_webserver(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"dagster-webserver exited:\n{log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"dagster-webserver did not answer:\n{log.read_text(errors='replace')}")


@contextmanager
def ui_stack(app_url: str, storage_url: str, start_date: str) -> Iterator[Stack]:
    """Run webserver and daemon on the app database ``app_url``; stop both on exit."""
    with tempfile.TemporaryDirectory(prefix="session-cleanup-ui-") as tmp:
        home = Path(tmp)
        (home / "dagster.yaml").write_text(DAGSTER_YAML)
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "DAGSTER_PG_URL": storage_url,
            "APP_DATABASE_URL": app_url,
            "SESSION_CLEANUP_START_DATE": start_date,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        webserver = [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port)]
        web_log, daemon_log = home / "webserver.log", home / "daemon.log"
        processes = []
        try:
            processes.append(_start([*webserver, "-w", "workspace.yaml"], env, web_log))
            processes.append(
                _start(
                    [str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], env, daemon_log
                )
            )
            _wait_for_webserver(url, processes[0], web_log)
            yield Stack(url=url, home=home, logs=home)
        finally:
            for process in reversed(processes):
                _stop(process)
