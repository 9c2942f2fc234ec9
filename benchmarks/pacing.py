"""``python -m benchmarks.pacing``: the app's latency while the steps run, by batch size and pause.

Answers one question: does the app's p99 during a cleanup depend on how the cleanup paces
itself? On copies of one seeded template it runs the app load (app_load.py) at idle, then
during the three step functions (the job's order) at each ``--targets`` batch duration and
each ``--pauses`` ratio (after every batch, sleep that many times the batch's duration: 1.0
halves the write rate), and each ``--commits`` mode of the batches: ``async`` as the steps
commit (``steps.ASYNC_COMMIT``), or ``sync``, waiting for each batch's WAL flush as they
did before 2026-11-29. It prints, per run, the steps' time and the app's latency by kind of
write: session updates meet the rows ``expire_sessions`` locks, decline upserts never do.
Nothing is asserted; compare lines within one run.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from session_cleanup_dev.seed import parse_scale

from benchmarks import app_load, databases
from benchmarks.__main__ import _exit_on_sigterm
from benchmarks.approaches import JOB_ORDER
from benchmarks.runner import CUTOFF
from session_cleanup_dagster import steps
from session_cleanup_dagster.resources import make_engine

Sample = tuple[float, float, str]

# What each batch runs first, by --commits mode.
COMMITS = {"async": steps.ASYNC_COMMIT, "sync": sa.text("SET LOCAL synchronous_commit = on")}


def latency(samples: list[Sample]) -> str:
    """``kind n p50/p99/max ms`` for sessions, declines and both."""
    parts = []
    for kind in ("session", "decline", None):
        stats = app_load.percentiles([s[1] for s in samples if kind is None or s[2] == kind])
        if stats["ops"]:
            parts.append(
                f"{kind or 'all'} {stats['ops']} "
                f"{stats['p50_ms']:.2f}/{stats['p99_ms']:.2f}/{stats['max_ms']:.1f}"
            )
    return "; ".join(parts)


def pacer(pause: float) -> Callable[[steps.Progress], None]:
    """A before_batch hook that sleeps ``pause`` times the last batch's duration."""
    last: list[float] = []

    def hook(_: steps.Progress) -> None:
        now = time.monotonic()
        if pause and last:
            time.sleep((now - last[0]) * pause)
        last[:] = [time.monotonic()]

    return hook


def cleanup_under_load(
    url: str, users: int, target: int, pause: float, commit: str = "async"
) -> str:
    engine = make_engine(url)
    load = app_load.AppLoad(app_load.LoadSpec(url, users, CUTOFF))
    load.start()
    started = time.monotonic()
    took: dict[str, Any] = {}
    steps.ASYNC_COMMIT = COMMITS[commit]
    try:
        options = steps.StepOptions(target_batch_ms=target)
        for name in JOB_ORDER:
            t0 = time.monotonic()
            result = getattr(steps, name)(engine, CUTOFF, options, before_batch=pacer(pause))
            took[name] = f"{time.monotonic() - t0:.2f} s/{result.batches}"
    finally:
        steps.ASYNC_COMMIT = COMMITS["async"]
        samples = load.stop()
        engine.dispose()
    during = [s for s in samples if s[0] >= started]
    return f"steps {took}; app {latency(during)}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pacing", description=__doc__)
    parser.add_argument("--scale", default="S")
    parser.add_argument("--targets", default="100,50,25", help="target_batch_ms values")
    parser.add_argument("--pauses", default="0,1", help="pause / batch duration ratios")
    parser.add_argument("--commits", default="async", help="batch commit modes: async, sync")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--idle-s", type=float, default=5.0)
    parser.add_argument("--admin-url", default=os.environ.get(databases.ADMIN_URL_ENV) or None)
    args = parser.parse_args(argv)
    users = parse_scale(args.scale)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with databases.admin_server(args.admin_url) as admin_url:
        return _measure(args, users, databases.Server(admin_url))


def _measure(args: argparse.Namespace, users: int, server: databases.Server) -> int:
    try:
        template, _ = databases.seed_template(server, "pacing", users, CUTOFF)
        for round_ in range(1, args.rounds + 1):
            with server.copy(template, f"idle{round_}") as url:
                load = app_load.AppLoad(app_load.LoadSpec(url, users, CUTOFF))
                load.start()
                time.sleep(args.idle_s)
                print(f"round {round_} idle: app {latency(load.stop())}", flush=True)
            settings = [
                (float(pause), int(target), commit)
                for pause in args.pauses.split(",")
                for target in args.targets.split(",")
                for commit in args.commits.split(",")
            ]
            for pause, target, commit in settings:
                with server.copy(template, f"t{target}_{round_}") as url:
                    line = cleanup_under_load(url, users, target, pause, commit)
                print(
                    f"round {round_} target {target} ms, pause {pause}, {commit} commits: {line}",
                    flush=True,
                )
    finally:
        server.drop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
