"""The code location: assembles the definitions and nothing else."""

import dagster as dg

from session_cleanup_dagster import checks
from session_cleanup_dagster.assets import table_specs
from session_cleanup_dagster.dry_run import build_dry_run_job
from session_cleanup_dagster.jobs import build_job, partitions_start_date
from session_cleanup_dagster.resources import AppDatabase
from session_cleanup_dagster.schedules import build_schedule
from session_cleanup_dagster.sensors import build_sensors

session_cleanup_job = build_job(partitions_start_date())

defs = dg.Definitions(
    assets=table_specs(),
    asset_checks=checks.CHECKS,
    jobs=[session_cleanup_job, build_dry_run_job(), checks.checks_job],
    schedules=[build_schedule(session_cleanup_job)],
    sensors=[*build_sensors(session_cleanup_job), *checks.build_sensors(session_cleanup_job)],
    # The URL comes from $APP_DATABASE_URL when a run needs it (AppDatabase.database_url).
    resources={"app_db": AppDatabase()},
)
