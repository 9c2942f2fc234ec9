"""Runs the approaches on identical copies of one seeded database per scale."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from benchmarks import app_load, databases
from benchmarks.approaches import APP_NAME, STEPS, parse_approach

log = logging.getLogger("benchmarks")

CUTOFF = datetime(2026, 11, 28, 4, 0, tzinfo=UTC)
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Options:
    scales: list[tuple[str, int]]
    approaches: list[str]
    admin_url: str
    guard_s: float = 600.0
    repeat: int = 1
    idle_s: float = 10.0
    load_interval_s: float = 0.01
    overhead_runs: int = 3
    multiprocess: bool = True
    sample_every_s: float = 0.02
    results: dict[str, Any] = field(default_factory=dict)
    # approach@ref -> a checkout of ref (made by ``checkouts``)
    trees: dict[str, Path] = field(default_factory=dict)


class XactSampler:
    """Samples pg_stat_activity: the cleanup's open transactions, the app's lock waits."""

    def __init__(self, admin_url: str, database: str, every_s: float) -> None:
        self.admin_url = admin_url
        self.database = database
        self.every_s = every_s
        self.longest = 0.0
        # (pid, query_start) of an app write seen waiting on a lock -> longest wait seen.
        self.lock_waits: dict[tuple[int, str], float] = {}
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        sql = (
            "SELECT coalesce(max(extract(epoch FROM clock_timestamp() - xact_start)), 0)"
            " FROM pg_stat_activity WHERE datname = %s AND application_name = %s"
            " AND xact_start IS NOT NULL"
        )
        waits = (
            "SELECT pid, query_start::text,"
            " extract(epoch FROM clock_timestamp() - query_start)"
            " FROM pg_stat_activity WHERE datname = %s AND application_name = %s"
            " AND wait_event_type = 'Lock'"
        )
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            while not self.stop_event.is_set():
                row = conn.execute(sql, (self.database, APP_NAME)).fetchone()
                if row is not None:
                    self.longest = max(self.longest, float(row[0]))
                for pid, started, seconds in conn.execute(
                    waits, (self.database, app_load.APP_NAME)
                ):
                    key = (int(pid), str(started))
                    self.lock_waits[key] = max(self.lock_waits.get(key, 0.0), float(seconds))
                self.stop_event.wait(self.every_s)

    def lock_wait_summary(self) -> dict[str, Any]:
        return {
            "lock_waits_seen": len(self.lock_waits),
            "lock_waits_over_1s": sum(1 for s in self.lock_waits.values() if s > 1.0),
            "longest_lock_wait_s": max(self.lock_waits.values(), default=0.0),
        }

    def __enter__(self) -> XactSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(10)


@contextlib.contextmanager
def checkouts(approaches: list[str]) -> Iterator[dict[str, Path]]:
    """A detached worktree of this repository per ``approach@ref``; removed afterwards."""
    trees: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="scbench-trees-") as root:
        try:
            for approach in approaches:
                _, ref = parse_approach(approach)
                if ref is None:
                    continue
                tree = Path(root) / str(len(trees))
                subprocess.run(
                    ["git", "worktree", "add", "--quiet", "--detach", str(tree), ref],
                    cwd=REPO,
                    check=True,
                )
                trees[approach] = tree
            yield trees
        finally:
            for tree in trees.values():
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False
                )


def run_child(approach: str, url: str, guard_s: float, tree: Path | None = None) -> dict[str, Any]:
    """Run one approach in a fresh Python process; its JSON line is the result.

    ``tree``: a checkout of another commit, whose package and benchmark code run instead of
    this one's (first on the path, before the editable install's finder).
    """
    started = time.monotonic()
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), str(tree / "dev")])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.approaches",
            approach.partition("@")[0],  # the name; the ref is in ``tree``
            url,
            CUTOFF.isoformat(),
            str(guard_s),
        ],
        cwd=tree or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=guard_s * 3 + 900,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{approach} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["_process"]["outer_wall_s"] = time.monotonic() - started
    return result


def _bins(series: list[tuple[float, float]], width: float = 0.25) -> list[tuple[float, float]]:
    """The worst latency per ``width`` seconds: small enough to keep, enough to plot."""
    worst: dict[int, float] = {}
    for t, ms in series:
        key = int(t // width)
        worst[key] = max(worst.get(key, 0.0), ms)
    return [(round(k * width, 3), v) for k, v in sorted(worst.items())]


def measure(
    options: Options, server: databases.Server, template: str, users: int, approach: str, tag: str
) -> dict[str, Any]:
    with server.copy(template, tag) as url:
        before = databases.expected_state(url, CUTOFF)
        database = databases.database_of(url)
        spec = app_load.LoadSpec(
            url,
            users,
            CUTOFF,
            interval_s=options.load_interval_s,
            max_s=options.guard_s * 3 + 600,
        )
        load = app_load.AppLoad(spec)
        with XactSampler(server.admin_url, database, options.sample_every_s) as sampler:
            since = load.start()
            try:
                child = run_child(approach, url, options.guard_s, options.trees.get(approach))
            finally:
                samples = load.stop()
        app = app_load.summarize(samples, since)
        app["series"] = _bins(app["series"])
        app.update(sampler.lock_wait_summary())
        unfinished = [s for s in STEPS if not child.get(s, {}).get("done", False)]
        check = databases.verify(url, CUTOFF, before, app_writes=app["ops"], unfinished=unfinished)
        result: dict[str, Any] = {
            "approach": approach,
            "steps": {s: child[s] for s in STEPS},
            "process": child["_process"],
            "job": child.get("_job"),
            "longest_xact_s": sampler.longest,
            "app": app,
            "verified": check,
            "due_before": {s: before[f"due_{s}"] for s in STEPS},
        }
        if parse_approach(approach)[0] == "job":

            def repeat(what: str) -> list[dict[str, Any]]:
                # The job's zero-row runs with its own code (job@REF: that commit's).
                tree = options.trees.get(approach) if what == "job" else None
                return [
                    run_child(what, url, options.guard_s, tree)
                    for _ in range(options.overhead_runs)
                ]

            # The same job again on the now clean copy: a run with nothing to change.
            result["zero_row_runs"] = repeat("job")
            # And the limit's three statements on that copy: what merely finding that nothing
            # is due costs the database, the floor under any zero-row run.
            result["zero_row_limit_runs"] = repeat("limit")
            # Both again once the copy is vacuumed, as a later night finds the tables after
            # autovacuum: the cleanup's deletes and updates cleared the visibility map, so
            # right after it an index-only read pays a heap fetch for most keys.
            if options.overhead_runs:
                databases.vacuum(url)
            result["zero_row_vacuumed_runs"] = repeat("job")
            result["zero_row_vacuumed_limit_runs"] = repeat("limit")
    return result


# A query that keeps one backend on a CPU for a while and touches no table: no lock, no
# page of the app's tables, no WAL. Run back to back, it costs the app what any work that
# occupies one core of the server's machine costs it, and nothing a cleanup adds to that.
BUSY_SQL = "SELECT count(*) FROM generate_series(1, 2000000)"


def _compute(url: str, stop: threading.Event) -> int:
    """Runs BUSY_SQL back to back until ``stop``; returns how many ran."""
    done = 0
    with psycopg.connect(url, autocommit=True, application_name=APP_NAME) as conn:
        while not stop.is_set():
            conn.execute(BUSY_SQL).fetchone()
            done += 1
    return done


def idle_baseline(
    options: Options,
    server: databases.Server,
    template: str,
    users: int,
    tag: str,
    busy: bool = False,
) -> dict[str, Any]:
    """The app's latency with no cleanup; with ``busy``, while one backend only computes."""
    with server.copy(template, tag) as url:
        spec = app_load.LoadSpec(url, users, CUTOFF, interval_s=options.load_interval_s)
        load = app_load.AppLoad(spec)
        since = load.start()
        stop = threading.Event()
        queries: list[int] = []
        worker = None
        if busy:
            worker = threading.Thread(target=lambda: queries.append(_compute(url, stop)))
            worker.start()
        try:
            time.sleep(options.idle_s)
        finally:
            stop.set()
            if worker is not None:
                worker.join(60)
            samples = load.stop()
        app = app_load.summarize(samples, since)
        app["series"] = _bins(app["series"])
        if busy:
            if not queries:
                raise RuntimeError("the busy baseline's query failed; see the log above")
            app["busy_queries"] = queries[0]
        return app


def run(options: Options) -> dict[str, Any]:
    with checkouts(options.approaches) as trees:
        options.trees = trees
        return _run(options)


def _run(options: Options) -> dict[str, Any]:
    server = databases.Server(options.admin_url)
    results: dict[str, Any] = {
        "cutoff": CUTOFF.isoformat(),
        "guard_s": options.guard_s,
        "server_version": server.version(),
        "server_settings": server.settings(),
        "scales": {},
    }
    try:
        for scale, users in options.scales:
            log.info("%s: seeding %d users", scale, users)
            template, seed_s = databases.seed_template(server, scale, users, CUTOFF)
            entry: dict[str, Any] = {"users": users, "seed_s": seed_s, "runs": []}
            results["scales"][scale] = entry
            log.info("%s: seeded in %.1f s; idle app baseline", scale, seed_s)
            entry["idle"] = idle_baseline(options, server, template, users, f"{scale}_idle")
            log.info("%s: app baseline while one backend only computes", scale)
            entry["busy"] = idle_baseline(
                options, server, template, users, f"{scale}_busy", busy=True
            )
            for rep in range(options.repeat):
                for approach in options.approaches:
                    if approach == "old" and rep > 0:
                        continue  # once is enough: its NOT IN step alone takes the whole guard
                    log.info("%s: %s (round %d)", scale, approach, rep + 1)
                    tag = f"{scale}_{approach}_{rep}"
                    measured = measure(options, server, template, users, approach, tag)
                    measured["round"] = rep + 1
                    entry["runs"].append(measured)
                    _log_run(scale, measured)
            server.drop(template)
        if options.overhead_runs and "trivial" not in results:
            results["trivial"] = {
                "in_process": [
                    run_child("trivial_in_process", "-", 60) for _ in range(options.overhead_runs)
                ]
            }
            if options.multiprocess:
                results["trivial"]["multiprocess"] = [
                    run_child("trivial_multiprocess", "-", 60) for _ in range(options.overhead_runs)
                ]
    finally:
        server.drop_all()
    return results


def _log_run(scale: str, run: dict[str, Any]) -> None:
    parts = []
    for step in STEPS:
        s = run["steps"][step]
        wall = s.get("wall_s")
        parts.append(f"{step} {s['rows']} rows {wall:.2f} s" if wall else f"{step} -")
    log.info(
        "%s %s: %s; longest xact %.3f s; app p99 %s ms; verified %s",
        scale,
        run["approach"],
        ", ".join(parts),
        run["longest_xact_s"],
        run["app"]["p99_ms"],
        run["verified"]["ok"],
    )
