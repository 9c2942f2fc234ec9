"""The approaches, each run in a child process of its own (``python -m benchmarks.approaches``).

A child of its own per approach keeps one approach's memory out of another's peak RSS, and
the parent's samplers (app load, pg_stat_activity) out of both. The child prints one JSON
object: per step its wall time, rows and whether it finished; the process's peak RSS.
"""

from __future__ import annotations

import itertools
import json
import resource
import sys
import time
from datetime import datetime
from typing import Any

import psycopg

STEPS = ("expire_sessions", "purge_declines", "remove_orphan_fingerprints")
# The order the job runs its ops in (ops.py: the orphans first); the limit and the step
# functions run in it too, so every approach meets the same table states.
JOB_ORDER = ("remove_orphan_fingerprints", "expire_sessions", "purge_declines")
APPROACHES = ("old", "limit", "job", "steps")
LABELS = {
    "old": "the old worker's statements (RETURNING id, NOT IN)",
    "limit": "one statement each, NOT EXISTS, no RETURNING (the limit)",
    "job": "this project's job, end to end through Dagster",
    "steps": "this project's step functions, called directly",
}
APP_NAME = "bench-cleanup"


def parse_approach(name: str) -> tuple[str, str | None]:
    """``job`` or ``job@<git ref>``: an approach, and the commit whose code runs it (None:
    this checkout). A ref lets one run compare a change with the code before it."""
    base, _, ref = name.partition("@")
    if base not in APPROACHES or (ref == "" and "@" in name):
        raise ValueError(
            f"unknown approach {name!r}; choose from {APPROACHES}, each optionally @<git ref>"
        )
    return base, ref or None


def label(name: str) -> str:
    base, ref = parse_approach(name)
    return LABELS[base] + (f", the code at {ref}" if ref else "")


def _old_sql(t: str) -> list[tuple[str, str]]:
    # What the BullMQ worker ran (DESIGN.md), with the cutoff as a parameter.
    return [
        (
            "expire_sessions",
            "UPDATE after_hours_sessions SET ended_at = expires_at"
            " WHERE ended_at IS NULL AND expires_at < %(t)s RETURNING id",
        ),
        (
            "purge_declines",
            "DELETE FROM after_hours_declines WHERE created_at < %(t)s::timestamptz"
            " - interval '168 hours' RETURNING id",
        ),
        (
            "remove_orphan_fingerprints",
            "DELETE FROM device_fingerprints WHERE session_id IS NOT NULL"
            " AND created_at < %(t)s::timestamptz - interval '1 hour'"
            " AND session_id NOT IN (SELECT id FROM after_hours_sessions) RETURNING id",
        ),
    ]


def _limit_sql() -> list[tuple[str, str]]:
    return [
        (
            "expire_sessions",
            "UPDATE after_hours_sessions SET ended_at = expires_at"
            " WHERE ended_at IS NULL AND expires_at < %(t)s",
        ),
        (
            "purge_declines",
            "DELETE FROM after_hours_declines WHERE created_at < %(t)s::timestamptz"
            " - interval '168 hours'",
        ),
        (
            "remove_orphan_fingerprints",
            "DELETE FROM device_fingerprints f WHERE session_id IS NOT NULL"
            " AND created_at < %(t)s::timestamptz - interval '1 hour'"
            " AND NOT EXISTS (SELECT 1 FROM after_hours_sessions s WHERE s.id = f.session_id)",
        ),
    ]


def run_statements(url: str, cutoff: datetime, guard_s: float, old: bool) -> dict[str, Any]:
    """One statement per step, each its own transaction, under a statement_timeout guard."""
    steps: dict[str, Any] = {}
    if old:
        statements = _old_sql("t")  # the old worker's order
    else:
        by_step = dict(_limit_sql())
        statements = [(step, by_step[step]) for step in JOB_ORDER]
    with psycopg.connect(url, application_name=APP_NAME) as conn:
        conn.execute(f"SET statement_timeout = {int(guard_s * 1000)}")
        conn.commit()
        for step, sql in statements:
            started = time.monotonic()
            try:
                cur = conn.execute(sql, {"t": cutoff})
                # The old worker got every id back (RETURNING id) and held them all.
                ids = cur.fetchall() if old else None
                rows = len(ids) if ids is not None else cur.rowcount
                conn.commit()
                steps[step] = {"wall_s": time.monotonic() - started, "rows": rows, "done": True}
            except psycopg.errors.QueryCanceled:
                conn.rollback()
                steps[step] = {"wall_s": time.monotonic() - started, "rows": 0, "done": False}
            ids = None
    return steps


def run_steps(url: str, cutoff: datetime) -> dict[str, Any]:
    """The step functions at their defaults, each batch timed through the before_batch hook."""
    from session_cleanup_dagster import steps as s
    from session_cleanup_dagster.resources import make_engine

    engine = make_engine(url, application_name=APP_NAME)
    out: dict[str, Any] = {}
    try:
        for step in JOB_ORDER:
            marks: list[float] = []
            started = time.monotonic()
            result = getattr(s, step)(engine, cutoff, before_batch=_marker(marks))
            wall = time.monotonic() - started
            marks.append(_now())
            gaps = [b - a for a, b in itertools.pairwise(marks)]
            out[step] = {
                "wall_s": wall,
                "rows": result.changed,
                "batches": result.batches,
                "done": True,
                # Between two hooks: one batch (its transaction plus a little Python).
                "longest_batch_s": max(gaps, default=0.0),
            }
    finally:
        engine.dispose()
    return out


def _now() -> float:
    return time.monotonic()


def _marker(marks: list[float]) -> Any:
    return lambda _progress: marks.append(_now())


def run_job(url: str, cutoff: datetime) -> dict[str, Any]:
    """The real job through Dagster, in process (its own executor: in_process)."""
    import dagster as dg

    from session_cleanup_dagster.definitions import defs
    from session_cleanup_dagster.resources import AppDatabase

    job = defs.resolve_job_def("session_cleanup_job")
    run_config = {"ops": {op: {"config": {"as_of": cutoff.isoformat()}} for op in STEPS}}
    started = time.monotonic()
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(
            run_config=run_config,
            resources={"app_db": AppDatabase(url=url, application_name=APP_NAME)},
            instance=instance,
            raise_on_error=False,
        )
        wall = time.monotonic() - started
        times: dict[tuple[str, str], float] = {}
        for entry in instance.all_logs(result.run_id):
            event = entry.dagster_event
            if event is not None and event.step_key is not None:
                times[(event.step_key, event.event_type_value)] = entry.timestamp
    out: dict[str, Any] = {"_job": {"wall_s": wall, "success": result.success}}
    for step in STEPS:
        meta: dict[str, Any] = {}
        start = times.get((step, "STEP_START"))
        end = times.get((step, "STEP_SUCCESS"), times.get((step, "STEP_FAILURE")))
        for event in result.events_for_node(step):
            if event.event_type_value == "STEP_OUTPUT":
                data = event.event_specific_data
                meta = {k: v.value for k, v in data.metadata.items()}  # type: ignore[union-attr]
        out[step] = {
            "wall_s": end - start if end and start else None,
            "step_s": meta.get("duration_s"),
            "rows": meta.get("rows_changed", 0),
            "batches": meta.get("batches"),
            "done": (step, "STEP_SUCCESS") in times,
        }
    return out


def run_trivial(executor: str) -> dict[str, Any]:
    """A trivial 3-op job, run the same way as ours (for the overhead comparison)."""
    import dagster as dg

    from benchmarks import trivial

    started = time.monotonic()
    with dg.instance_for_test() as instance:
        if executor == "in_process":
            result = trivial.trivial_job.execute_in_process(instance=instance)
            ok = result.success
        else:
            recon = dg.reconstructable(trivial.trivial_multiprocess_job)
            with dg.execute_job(recon, instance=instance) as run:
                ok = run.success
    return {"_job": {"wall_s": time.monotonic() - started, "success": ok}}


def main(argv: list[str]) -> None:
    approach, url, cutoff_text, guard = argv[0], argv[1], argv[2], float(argv[3])
    cutoff = datetime.fromisoformat(cutoff_text)
    started = time.monotonic()
    if approach in ("old", "limit"):
        out = run_statements(url, cutoff, guard, old=approach == "old")
    elif approach == "steps":
        out = run_steps(url, cutoff)
    elif approach == "job":
        out = run_job(url, cutoff)
    elif approach.startswith("trivial_"):
        out = run_trivial(approach.removeprefix("trivial_"))
    else:
        raise SystemExit(f"unknown approach {approach}")
    out["_process"] = {
        "wall_s": time.monotonic() - started,
        # Linux reports ru_maxrss in KiB.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # Where the code under test came from: this checkout, or an approach@ref's worktree.
        "package": getattr(sys.modules.get("session_cleanup_dagster"), "__file__", None),
    }
    sys.stdout.write(json.dumps(out, default=str) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
