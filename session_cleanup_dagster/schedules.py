"""The nightly schedule: 04:00 UTC, targeting the partition whose window just ended."""

from __future__ import annotations

import dagster as dg


def build_schedule(job: dg.JobDefinition) -> dg.ScheduleDefinition:
    """``session_cleanup_schedule``: cron ``0 4 * * *`` in UTC, running by default.

    The tick at 04:00 UTC on day D+1 launches partition D, whose window ends at that instant,
    so the run's cutoff is the tick time. Written out rather than built with
    ``build_schedule_from_partitioned_job``, which gives the same cron and partition but, in
    1.13.27, defaults to STOPPED (a cleanup that must be switched on by hand after every
    deploy silently does not run) and warns on every tick that it calls the deprecated
    ``JobDefinition.run_request_for_partition``. ``tests/test_job.py`` checks both, so this
    stays only while they hold.
    """
    partitions = job.partitions_def
    assert isinstance(partitions, dg.TimeWindowPartitionsDefinition)

    @dg.schedule(
        name="session_cleanup_schedule",
        cron_schedule="0 4 * * *",
        execution_timezone="UTC",
        job=job,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Nightly at 04:00 UTC, one hour after the app's message cleanup at 03:00.",
    )
    def session_cleanup_schedule(
        context: dg.ScheduleEvaluationContext,
    ) -> dg.RunRequest | dg.SkipReason:
        with dg.partition_loading_context(effective_dt=context.scheduled_execution_time):
            partition_key = partitions.get_last_partition_key()
        if partition_key is None:
            return dg.SkipReason("No partition has ended yet (before the partitions' start).")
        # run_key = partition: a tick evaluated twice never launches the same night twice.
        return dg.RunRequest(run_key=partition_key, partition_key=partition_key)

    return session_cleanup_schedule
