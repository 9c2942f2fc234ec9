"""``session-cleanup demo``: the whole job on an embedded PostgreSQL, start to finish."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import dagster as dg

from session_cleanup_dagster.backlog import backlog
from session_cleanup_dagster.definitions import defs
from session_cleanup_dagster.resources import AppDatabase, make_engine
from session_cleanup_dev.embedded import embedded_postgres
from session_cleanup_dev.seed import seed_database, table_counts

STEP_TABLES = {
    "expire_sessions": "after_hours_sessions",
    "purge_declines": "after_hours_declines",
    "remove_orphan_fingerprints": "device_fingerprints",
}


def run_demo(home: Path, *, users: int, echo: Callable[[str], None]) -> bool:
    """Seed ``users`` users into a fresh embedded server, run the job, print what changed.

    Returns:
        True when the run succeeded and left no row that the contract says it should change.
    """
    with embedded_postgres(home / "postgres") as server:
        url = server.create_database("app")
        echo(f"Embedded PostgreSQL started in {home / 'postgres'}; database 'app' created.")
        engine = make_engine(url)
        try:
            seed_database(engine, users)
            before = table_counts(engine)
            job = defs.resolve_job_def("session_cleanup_job")
            with dg.DagsterInstance.ephemeral() as instance:
                result = job.execute_in_process(
                    # The ops' own INFO lines (cutoff, counts), not Dagster's DEBUG events.
                    run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
                    resources={"app_db": AppDatabase(url=url)},
                    instance=instance,
                    raise_on_error=False,
                )
                run = instance.get_run_by_id(result.run_id)
            after = table_counts(engine)
            cutoff = datetime.fromisoformat(run.tags["session_cleanup/cutoff"]) if run else None
            left = backlog(engine, cutoff) if cutoff else {}
        finally:
            engine.dispose()
    echo(f"Seeded {users} users; ran session_cleanup_job through Dagster (run {result.run_id}).")
    echo(f"Cutoff T = {cutoff.isoformat() if cutoff else '?'} (the database's now()).")
    echo("")
    echo(f"{'table':<22} {'before':>9} {'after':>9}")
    for table in before:
        echo(f"{table:<22} {before[table]:>9} {after[table]:>9}")
    echo("")
    echo(f"{'step':<28} {'changed':>8} {'still due':>10}")
    for step in STEP_TABLES:
        changed = _rows_changed(result, step)
        echo(f"{step:<28} {changed:>8} {left.get(step, -1):>10}")
    echo("")
    ok = result.success and all(count == 0 for count in left.values())
    echo(
        "Run "
        + (
            "succeeded; nothing left that the contract says to change."
            if ok
            else "FAILED or left rows behind; see the messages above."
        )
    )
    echo("Embedded PostgreSQL stopped and removed.")
    return ok


def _rows_changed(result: dg.ExecuteInProcessResult, step: str) -> int | str:
    for event in result.events_for_node(step):
        if event.event_type_value == "STEP_OUTPUT" and event.step_output_data is not None:
            value = event.step_output_data.metadata.get("rows_changed")
            if value is not None:
                return int(value.value)  # type: ignore[arg-type]
    return "failed"
