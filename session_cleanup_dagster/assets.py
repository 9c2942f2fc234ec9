"""The app's three tables as external assets, and what every run records on them.

The tables belong to the app, so Dagster does not materialize them; the cleanup changes them.
A real run logs an ``AssetMaterialization`` per table (rows changed, backlog left, duration,
cutoff), and Dagster's asset page plots every numeric entry over time. A dry run logs an
``AssetObservation`` instead, with ``dry_run: true`` and its counts under ``would_change``
and ``dry_run_duration_s``: it never adds a point to the ``rows_changed`` plot.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timedelta
from typing import Any

import dagster as dg
import sqlalchemy as sa

from session_cleanup_dagster import backlog, steps
from session_cleanup_dagster import tables as t
from session_cleanup_dagster.contract import GRACE, RETENTION, describe

GROUP = "app_database"
OWNERS_ENV = "SESSION_CLEANUP_ASSET_OWNERS"
DEFAULT_OWNERS = ("team:platform",)

# Inside a cleanup run the backlog is counted exactly only on a table this small; a larger one
# is estimated from a sample of this many pages. An exact count of a large table is one long
# read (a hash anti-join over every session for the orphans; for the sessions, a walk through
# the partial index entries of every session just ended, 1.0 s at L) and would be the run's
# longest transaction, longer than any batch. The SLO checks, a separate
# job, count exactly up to their own exact_max_pages (1 GiB by default).
REPORT_EXACT_MAX_PAGES = 256
REPORT_SAMPLE_PAGES = 256
# The orphans' sample probes the sessions' primary key for each of its rows (some 135 pages
# touched per fingerprint page): 256 pages cost 34,600 pages at S on a steady night, more than
# the single statement's whole orphan delete (29,100; benchmarks/steady_night.py). 16 pages
# cost about 2,200, whatever the table's size.
REPORT_PROBING_SAMPLE_PAGES = 16

STEP_TABLES = {
    "expire_sessions": t.SESSIONS,
    "purge_declines": t.DECLINES,
    "remove_orphan_fingerprints": t.FINGERPRINTS,
}

DESCRIPTIONS = {
    t.SESSIONS: (
        "The app's After Hours sessions. Cleanup: expire_sessions sets ended_at = expires_at on "
        "every open session whose expires_at is before the cutoff."
    ),
    t.DECLINES: (
        "Declines between users. Cleanup: purge_declines deletes those created before the "
        f"cutoff minus the retention ({describe(RETENTION)} unless configured)."
    ),
    t.FINGERPRINTS: (
        "Device fingerprints. Cleanup: remove_orphan_fingerprints deletes those whose session "
        f"no longer exists, older than the cutoff minus the grace period ({describe(GRACE)} "
        "unless configured)."
    ),
}

_TEAM = re.compile(r"^team:[A-Za-z0-9_-]+$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def asset_key(table: str) -> dg.AssetKey:
    """``app_database/<table>``: the prefix keeps the keys apart from other code locations'."""
    return dg.AssetKey([GROUP, table])


def owners() -> list[str]:
    """Owners from ``SESSION_CLEANUP_ASSET_OWNERS`` (comma-separated), else ``team:platform``.

    Raises:
        ValueError: an entry is neither an email address nor ``team:<name>``.
    """
    raw = os.environ.get(OWNERS_ENV, "")
    found = [entry.strip() for entry in raw.split(",") if entry.strip()] or list(DEFAULT_OWNERS)
    bad = [entry for entry in found if not (_TEAM.match(entry) or _EMAIL.match(entry))]
    if bad:
        raise ValueError(
            f"{OWNERS_ENV} has {', '.join(map(repr, bad))}: each owner must be an email address "
            "or team:<name>, separated by commas."
        )
    return found


# A table whose cleanup has not succeeded for this long is stale: each table's freshness in
# the UI (Dagster's freshness daemon, from the last real run's materialization), and the
# staleness alert (sensors.py), which also covers a deployment that never succeeded.
STALE_AFTER = timedelta(hours=26)


def table_specs() -> list[dg.AssetSpec]:
    """The three tables as external assets (no connection is made)."""
    return [
        dg.AssetSpec(
            key=asset_key(table),
            group_name=GROUP,
            description=DESCRIPTIONS[table],
            owners=owners(),
            kinds={"postgres"},
            metadata={"table": table},
            freshness_policy=dg.FreshnessPolicy.time_window(fail_window=STALE_AFTER),
        )
        for table in STEP_TABLES.values()
    ]


def record_step(
    context: dg.OpExecutionContext,
    result: steps.StepResult,
    left: backlog.Count,
    source: str,
) -> None:
    """Log the step's event on its table: a materialization, or an observation if dry."""
    key = asset_key(STEP_TABLES[result.step])
    metadata: dict[str, Any] = {
        "backlog_rows": left.rows,
        "backlog_exact": left.exact,
        "backlog_method": left.method,
        "cutoff": dg.MetadataValue.timestamp(result.cutoff),
        # Plots only draw int and float entries, so the cutoff also goes in as a number.
        "cutoff_epoch_s": result.cutoff.timestamp(),
        "cutoff_source": source,
        "dry_run": result.dry_run,
    }
    if result.dry_run:
        metadata["would_change"] = result.changed
        metadata["dry_run_duration_s"] = round(result.duration_s, 3)
        context.log_event(dg.AssetObservation(asset_key=key, metadata=metadata))
    else:
        metadata["rows_changed"] = result.changed
        metadata["batches"] = result.batches
        metadata["duration_s"] = round(result.duration_s, 3)
        context.log_event(dg.AssetMaterialization(asset_key=key, metadata=metadata))


def backlog_left(
    engine: sa.Engine, step: str, cutoff: datetime, schema: str = "public", **step_kwargs: Any
) -> backlog.Count:
    """What a real run of ``step`` left, counted the bounded way a run reports it."""
    with engine.connect() as conn:
        return backlog.probe(
            conn,
            step,
            cutoff,
            schema=schema,
            exact_max_pages=REPORT_EXACT_MAX_PAGES,
            sample_pages=REPORT_SAMPLE_PAGES,
            sample_indexed=True,
            probing_sample_pages=REPORT_PROBING_SAMPLE_PAGES,
            **step_kwargs,
        )


def report_step(
    context: dg.OpExecutionContext,
    engine: sa.Engine,
    schema: str,
    result: steps.StepResult,
    source: str,
    **step_kwargs: Any,
) -> None:
    """Count the backlog the step left (see backlog.py for its cost) and log the event.

    A dry run has just counted what still matches, exactly, by the step's own walk; a real
    run counts what it left with a bounded probe (exact on a small table, else a sample).
    """
    if result.dry_run:
        left = backlog.Count(
            rows=result.changed,
            exact=True,
            capped=False,
            method="exact, counted by the dry run's own walk",
        )
    else:
        left = backlog_left(engine, result.step, result.cutoff, schema, **step_kwargs)
    context.log.info("%s: backlog %d rows (%s)", result.step, left.rows, left.method)
    record_step(context, result, left, source)
