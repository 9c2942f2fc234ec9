"""The job: three independent ops, partitioned by day, one run per night.

The ops have no data dependencies, so a failing step does not stop the other two; the run
still fails. The in-process executor runs them one after another in the run worker: a
cleanup gains nothing from running its steps in parallel against one database, and the
multiprocess executor adds seconds of process start-up per op (benchmarks/README.md).
"""

from __future__ import annotations

import os
from datetime import date

import dagster as dg

from session_cleanup_dagster.ops import expire_sessions, purge_declines, remove_orphan_fingerprints

START_DATE_ENV = "SESSION_CLEANUP_START_DATE"
# Every run of the job carries this tag; dagster.yaml's run queue admits one run with it at
# a time (concurrency.runs.tag_concurrency_limits).
EXCLUSIVE_TAG = "session_cleanup/exclusive"
# The tags every cleanup run carries: the exclusive tag, and no run retry after a failure in
# an op (safety cap, held lock, bad config would only fail again; transient errors are
# retried inside the op). The run tag wins over the instance's run_retries setting, so the
# guard holds whatever instance runs the job.
RUN_TAGS = {
    "team": "platform",
    EXCLUSIVE_TAG: "app_db",
    "dagster/retry_on_asset_or_op_failure": "false",
}
DEFAULT_START_DATE = "2026-01-01"


def partitions_start_date() -> str:
    """The first partition's date: ``SESSION_CLEANUP_START_DATE`` (YYYY-MM-DD) or 2026-01-01.

    Raises:
        ValueError: the variable is set but is not a date.
    """
    value = os.environ.get(START_DATE_ENV, "").strip() or DEFAULT_START_DATE
    try:
        date.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{START_DATE_ENV}={value!r} is not a date; write it as YYYY-MM-DD."
        ) from None
    return value


def daily_partitions(start_date: str) -> dg.DailyPartitionsDefinition:
    """Day D's window runs from 04:00 UTC on D to 04:00 UTC on D+1; its end is T."""
    return dg.DailyPartitionsDefinition(start_date=start_date, hour_offset=4, timezone="UTC")


def build_job(start_date: str) -> dg.JobDefinition:
    """``session_cleanup_job`` with partitions from ``start_date``."""

    @dg.job(
        name="session_cleanup_job",
        description=(
            "Nightly cleanup of the app database: expire sessions, purge old declines, remove "
            "orphan device fingerprints. Batched, skips rows the app holds locked, safe to "
            "cancel at any instant."
        ),
        partitions_def=daily_partitions(start_date),
        executor_def=dg.in_process_executor,
        tags=RUN_TAGS,
    )
    def session_cleanup_job() -> None:
        expire_sessions()
        purge_declines()
        remove_orphan_fingerprints()

    return session_cleanup_job
