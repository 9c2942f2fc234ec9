"""``session-cleanup dev`` as an operator starts it: in the background, then SIGTERM mid-run.

Touches: cli.py, devstack.py (process groups, signal handling, orderly shutdown), the
embedded PostgreSQL (app database, seeded) and Postgres run storage in a scratch database on
the test server (so the run's final status can be read after the stack is gone).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests import pg
from tests.stack import BIN, REPO, Stack, dagster_home, instance, wait_for


def _ignore_sigint() -> None:
    # What a shell does to a background job: the stack must still obey SIGTERM, and its run
    # workers must still obey the SIGINT that Dagster terminates them with.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture
def storage_url(admin_url: str) -> Iterator[str]:
    with pg.scratch_database(admin_url) as url:
        yield url


def test_sigterm_during_a_run_cancels_it_and_leaves_nothing_running(
    storage_url: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("APP_DATABASE_URL", "DAGSTER_HOME")}
    env["DAGSTER_PG_URL"] = storage_url
    log = (tmp_path / "dev.log").open("w+")
    proc = subprocess.Popen(
        [str(BIN / "session-cleanup"), "dev", "--port", "0", "--users", "4000"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_ignore_sigint,
        start_new_session=True,
    )
    try:
        url = wait_for(
            "the dev stack to be ready",
            lambda: re.search(r"Dagster UI: (http://127\.0\.0\.1:(\d+))", _text(tmp_path)),
            180,
            interval=0.5,
        )
        stack = Stack(home=tmp_path, env=env, port=int(url.group(2)))
        # Fixed batches of one: expire_sessions has 3000 due rows, many seconds of work.
        run_id = stack.submit(per_op={"expire_sessions": {"batch_size": 1, "target_batch_ms": 0}})
        stack.wait_status(run_id, {"STARTED"}, timeout=60)
        time.sleep(1.0)
        assert stack.status(run_id) == "STARTED"
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        started = re.search(r"Embedded PostgreSQL 16 started \(pid (\d+)\)", _text(tmp_path))
        assert started is not None
        pg_pid = int(started[1])
        data_dir = Path(psutil.Process(pg_pid).cmdline()[2]).parent
        homes = {
            psutil.Process(p).environ().get("DAGSTER_HOME", "")
            for p in family[1:]
            if psutil.pid_exists(p)
        }
        asked = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, _text(tmp_path)
        print(f"\n[timing] SIGTERM -> dev exited: {time.monotonic() - asked:.1f} s")
    finally:
        if proc.poll() is None:
            # A failed assertion above: let dev shut its stack down in order, and if it does
            # not, kill every descendant (webserver and daemon run in process groups of their
            # own, so killing dev's group alone would leave them running).
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                descendants = psutil.Process(proc.pid).children(recursive=True)
                for child in [psutil.Process(proc.pid), *descendants]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        child.kill()
                proc.wait(10)
        log.close()
    out = _text(tmp_path)
    assert f"Run {run_id}: CANCELED" in out, out
    print("[timing] " + next(line for line in out.splitlines() if line.startswith(f"Run {run_id}")))
    assert "Stopped; nothing left running." in out
    alive = [p for p in [*family, pg_pid] if psutil.pid_exists(p) and _running(p)]
    assert not alive, f"left running: {alive}"
    assert not data_dir.exists(), "embedded PostgreSQL's directory was left behind"
    assert homes and all(h and not Path(h).exists() for h in homes), homes

    env["DAGSTER_HOME"] = ""
    with dagster_home(env), instance(env) as inst:
        run = inst.get_run_by_id(run_id)
        others = [r for r in inst.get_runs() if r.run_id != run_id]
    assert run is not None and run.status.value == "CANCELED"
    assert others == [], "the canceled run was retried or another run started"


def _text(tmp_path: Path) -> str:
    return (tmp_path / "dev.log").read_text(errors="replace")


def _running(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
