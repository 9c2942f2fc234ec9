"""The nightly schedule: 04:00 UTC, targeting the partition whose window just ended."""

from __future__ import annotations

import dagster as dg


def build_schedule(job: dg.JobDefinition) -> dg.ScheduleDefinition:
    """``session_cleanup_schedule``: cron ``0 4 * * *`` in UTC, running by default.

    Derived from the job's partitions, so the tick at 04:00 UTC on day D+1 launches partition
    D with cutoff 04:00 UTC on D+1. Dagster's default for such schedules is STOPPED; a cleanup
    that must be switched on by hand after every deploy would silently not run.
    """
    schedule = dg.build_schedule_from_partitioned_job(
        job,
        name="session_cleanup_schedule",
        description="Nightly at 04:00 UTC, one hour after the app's message cleanup at 03:00.",
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )
    assert isinstance(schedule, dg.ScheduleDefinition)
    return schedule
