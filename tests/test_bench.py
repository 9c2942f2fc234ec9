"""The benchmark command, as a smoke run at scale XS: it runs every approach and verifies.
Also ``benchmarks.pacing``, which must run and measure what it says.

Touches: benchmarks/ end to end (seeding, the old and limit statements, the job through
Dagster, the step functions, the app load, the report) on the test server. It asserts that
the command runs and that every approach left the state the contract requires; it never
asserts a timing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from benchmarks.approaches import STEPS
from benchmarks.databases import PREFIX

pytestmark = pytest.mark.slow  # ./run test starts the long modules first

REPO = Path(__file__).resolve().parent.parent


def _python_m(admin_url: str, module: str, *args: str, stdout: int) -> subprocess.Popen[str]:
    """``python -m module`` against the test server, as a user runs it; stderr captured."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env={**os.environ, "SESSION_CLEANUP_BENCH_ADMIN_URL": admin_url},
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
    )


def _benchmark(admin_url: str, out: Path, *args: str) -> subprocess.Popen[str]:
    """``python -m benchmarks``, without plots, its results in ``out``."""
    extra = ("--no-plots", "--out", str(out))
    return _python_m(admin_url, "benchmarks", *args, *extra, stdout=subprocess.DEVNULL)


def test_benchmark_xs_smoke_run_verifies_every_approach(admin_url: str, tmp_path: Path) -> None:
    # The step functions from a worktree of the last commit (NAME@REF), which is this
    # checkout's code in CI: the smoke run covers both ways of running an approach.
    approaches = "old,limit,job,steps@HEAD"
    args = ("--scales", "XS", "--idle-s", "1", "--overhead-runs", "1", "--approaches", approaches)
    with _benchmark(admin_url, tmp_path, *args) as proc:
        try:
            _, stderr = proc.communicate(timeout=300)
        finally:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    results = json.loads((tmp_path / "XS.json").read_text())
    runs = results["scales"]["XS"]["runs"]
    assert [run["approach"] for run in runs] == approaches.split(",")
    for run in runs:
        assert run["verified"]["ok"], (run["approach"], run["verified"])
        assert all(step["done"] for step in run["steps"].values()), run["approach"]
        assert all(n > 0 for n in run["app"]["ops_by_kind"].values()), run["app"]["ops_by_kind"]
    # The runs on the cleaned copy, right after the cleanup and after a VACUUM. The first
    # changes exactly the rows the app held while the job passed (left for the next run);
    # after it, nothing is left to change.
    (job,) = [run for run in runs if run["approach"] == "job"]
    left = job["verified"]["left_for_next_run"]
    expected = [left[f"due_{step}"] for step in STEPS]
    for when in ("zero_row", "zero_row_vacuumed"):
        (zero,) = job[f"{when}_runs"]
        assert zero["_job"]["success"], when
        assert [zero[step]["rows"] for step in STEPS] == expected, (when, zero, left)
        expected = [0, 0, 0]
        (floor,) = job[f"{when}_limit_runs"]
        assert [floor[step]["rows"] for step in STEPS] == expected, (when, floor)
    # The app's baselines: idle, and while one backend only computes.
    scale = results["scales"]["XS"]
    for baseline in ("idle", "busy"):
        assert all(n > 0 for n in scale[baseline]["ops_by_kind"].values()), baseline
    assert scale["busy"]["busy_queries"] > 0
    report = (tmp_path / "XS.md").read_text()
    assert "### Targets" in report
    # steps@HEAD ran the worktree's package, not this checkout's, and the worktree is gone.
    here, there = (run["process"]["package"] for run in runs[2:])
    assert Path(here).is_relative_to(REPO), here
    assert not Path(there).is_relative_to(REPO) and "scbench-trees-" in there, there
    assert not Path(there).exists()
    assert "the code at HEAD" in report
    assert "app while one backend only computes" in report
    assert "after a VACUUM (ANALYZE) of that copy" in report
    # Every database the benchmark created is gone.
    assert _databases(admin_url, f"{PREFIX}_{proc.pid}_%") == []


def test_a_terminated_benchmark_drops_its_databases(admin_url: str, tmp_path: Path) -> None:
    args = ("--scales", "XS", "--approaches", "limit", "--overhead-runs", "0")
    with _benchmark(admin_url, tmp_path, *args) as proc:
        try:
            mine = f"{PREFIX}_{proc.pid}_%"
            deadline = time.monotonic() + 120
            while not _databases(admin_url, mine):
                assert proc.poll() is None, "the benchmark ended before creating a database"
                assert time.monotonic() < deadline, "no benchmark database appeared"
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert _databases(admin_url, mine) == []


def test_pacing_measures_idle_and_each_setting_and_drops_its_databases(admin_url: str) -> None:
    args = (
        "--scale",
        "XS",
        "--targets",
        "100,25",
        "--pauses",
        "0,1",
        "--commits",
        "async,sync",
        "--rounds",
        "1",
        "--idle-s",
        "1",
    )
    proc, stdout = _printed(admin_url, "benchmarks.pacing", *args)
    lines = stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "round 1 idle",
        *(
            f"round 1 target {target} ms, pause {pause}, {commit} commits"
            for pause in ("0.0", "1.0")
            for target in (100, 25)
            for commit in ("async", "sync")
        ),
    ], lines
    # Every line measured both kinds of app write.
    assert all("session " in line and "decline " in line for line in lines), lines
    assert all("remove_orphan_fingerprints" in line for line in lines[1:]), lines
    assert _databases(admin_url, f"{PREFIX}_{proc.pid}_%") == []


def test_replica_benchmark_reports_wal_lag_and_time_per_step_held_and_unheld(
    admin_url: str,
) -> None:
    args = ("--scale", "XS", "--limits", "0,1", "--slow-replay-ms", "300")
    _, stdout = _printed(admin_url, "benchmarks.replica", *args)
    lines = stdout.splitlines()
    for label in ("no hold", "hold at 1 MB"):
        rows = [line for line in lines if line.strip().startswith(label)]
        assert [step for step in STEPS if any(step in row for row in rows)] == list(STEPS)
        assert all("WAL" in row and "max replay lag" in row for row in rows[:3]), rows
        assert any("all three" in row for row in rows), rows


def _printed(admin_url: str, module: str, *args: str) -> tuple[subprocess.Popen[str], str]:
    """Run ``python -m module`` to its end (5 min at most); it must succeed. Its stdout."""
    with _python_m(admin_url, module, *args, stdout=subprocess.PIPE) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=300)
        finally:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    return proc, stdout


def _databases(admin_url: str, pattern: str) -> list[str]:
    with psycopg.connect(admin_url) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (pattern,)
        ).fetchall()
    return [row[0] for row in rows]
