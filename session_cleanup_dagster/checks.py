"""The cleanup's SLO as asset checks on the three tables, and the job and sensors that run them.

"The run was green" is not "the database is clean": each check asks the database itself.
Thresholds and severity are run config (launchpad), with the SLO's values as defaults. The
queries are ``backlog.probe`` with a cutoff one slack period before the database's ``now()``,
so their cost is bounded the same way (see backlog.py): a LIMIT-bounded range of the partial
index on open sessions; for declines and fingerprints, which have no ``created_at`` index, one
pass over the heap up to 1 GiB and a page sample past that (the result then says it is an
estimate). A failing check shows the offending count and a few sample ids.

``session_cleanup_checks_job`` runs the three checks; it is launchable on its own, and the
two run-status sensors launch it whenever ``session_cleanup_job`` finishes, succeeded or
failed (a failed night is exactly when the SLO matters).
"""

from datetime import datetime, timedelta

import dagster as dg
import sqlalchemy.exc
from pydantic import Field

from session_cleanup_dagster import backlog, errors, steps
from session_cleanup_dagster import tables as t
from session_cleanup_dagster.alerts import post_alert
from session_cleanup_dagster.assets import asset_key
from session_cleanup_dagster.contract import GRACE, GRACE_MINUTES, RETENTION, RETENTION_DAYS
from session_cleanup_dagster.resources import AppDatabase

CHECKS_JOB = "session_cleanup_checks_job"


class SloCheckConfig(dg.Config):  # type: ignore[misc]
    """What every SLO check takes."""

    severity: str = Field(
        default="ERROR",
        description="WARN or ERROR: how a failed check is shown; a failed ERROR check alerts.",
    )
    allowed_rows: int = Field(
        default=0, description="The check fails when more rows than this are overdue."
    )
    sample_size: int = Field(default=5, description="Offending ids shown (0 to 50).")
    exact_max_pages: int = Field(
        default=backlog.EXACT_MAX_PAGES,
        description="Count exactly up to this many heap pages (8 KiB); sample larger tables.",
    )
    sample_pages: int = Field(
        default=backlog.SAMPLE_PAGES, description="Pages read when sampling a larger table."
    )

    def problems(self) -> list[str]:
        found = []
        if self.severity.upper() not in ("WARN", "ERROR"):
            found.append(f"severity is {self.severity!r}; use WARN or ERROR.")
        if self.allowed_rows < 0:
            found.append(f"allowed_rows is {self.allowed_rows}; use 0 or more.")
        if not 0 <= self.sample_size <= 50:
            found.append(f"sample_size is {self.sample_size}; use 0 to 50.")
        if self.exact_max_pages < 0 or self.sample_pages < 1:
            found.append("exact_max_pages must be 0 or more and sample_pages 1 or more.")
        return found


class OpenSessionsCheckConfig(SloCheckConfig):  # type: ignore[misc]
    """``no_overdue_open_sessions``."""

    max_overdue_hours: float = Field(
        default=24.0, description="An open session may be expired at most this long."
    )


class OldDeclinesCheckConfig(SloCheckConfig):  # type: ignore[misc]
    """``no_declines_past_retention``."""

    retention_days: int = Field(
        default=RETENTION_DAYS, description="The cleanup's retention (purge_declines)."
    )
    slack_hours: float = Field(default=24.0, description="Allowed lateness past the retention.")


class OrphanFingerprintsCheckConfig(SloCheckConfig):  # type: ignore[misc]
    """``no_old_orphan_fingerprints``."""

    grace_minutes: int = Field(default=GRACE_MINUTES, description="The cleanup's grace period.")
    slack_hours: float = Field(default=24.0, description="Allowed lateness past the grace.")


def evaluate(
    context: dg.AssetCheckExecutionContext,
    app_db: AppDatabase,
    step: str,
    config: SloCheckConfig,
    *,
    slack: timedelta,
    what: str,
    retention: timedelta = RETENTION,
    grace: timedelta = GRACE,
) -> dg.AssetCheckResult:
    """Count the rows ``step`` should have handled more than ``slack`` ago; pass if few enough.

    A check that fails at ERROR severity alerts (alerts.py) once per evaluation, naming the
    table, the overdue count and the cutoff.

    Raises:
        dagster.Failure: bad config or a database error (no password in the message).
    """
    problems = config.problems()
    if problems:
        raise dg.Failure(description=f"invalid check config: {' '.join(problems)}")
    try:
        engine = app_db.get_engine()
        now = steps.database_now(engine)
        with engine.connect() as conn:
            found = backlog.probe(
                conn,
                step,
                now - slack,
                retention=retention,
                grace=grace,
                schema=app_db.db_schema,
                samples=config.sample_size,
                exact_max_pages=config.exact_max_pages,
                sample_pages=config.sample_pages,
            )
    except errors.ConfigError as exc:
        raise dg.Failure(description=errors.redact(str(exc), [app_db.password()])) from None
    except sqlalchemy.exc.DBAPIError as exc:
        where = f"SLO check on {app_db.describe()}"
        raise dg.Failure(
            description=errors.explain(exc, where=where, secrets=[app_db.password()])
        ) from None
    passed = found.rows <= config.allowed_rows
    severity = dg.AssetCheckSeverity(config.severity.upper())
    cutoff = now - slack
    alert = "not needed"
    if not passed and severity == dg.AssetCheckSeverity.ERROR:
        alert = _alert(context, app_db.db_schema, step, found, config, what, cutoff)
    return dg.AssetCheckResult(
        passed=passed,
        severity=severity,
        description=(
            f"{found.rows} {what} ({found.method}); allowed {config.allowed_rows}."
            if not passed
            else f"none beyond the allowed {config.allowed_rows} {what} ({found.method})."
        ),
        metadata={
            "offending_rows": found.rows,
            "allowed_rows": config.allowed_rows,
            "exact": found.exact,
            "method": found.method,
            "sample_ids": ", ".join(found.sample_ids) or "(none)",
            "checked_at": dg.MetadataValue.timestamp(now),
            "cutoff": dg.MetadataValue.timestamp(cutoff),
            "alert": alert,
        },
    )


_TABLES = {
    "expire_sessions": t.SESSIONS,
    "purge_declines": t.DECLINES,
    "remove_orphan_fingerprints": t.FINGERPRINTS,
}


def _alert(
    context: dg.AssetCheckExecutionContext,
    schema: str,
    step: str,
    found: backlog.Count,
    config: SloCheckConfig,
    what: str,
    cutoff: datetime,
) -> str:
    """Post the failed check; say in its metadata whether that worked (it never hides it)."""
    name = context.check_specs[0].name if context.check_specs else step
    text = (
        f":rotating_light: SLO check {name} failed on {schema}.{_TABLES[step]}: {found.rows} "
        f"{what} ({found.method}), allowed {config.allowed_rows}; cutoff "
        f"{cutoff.isoformat()} (the database's now() minus the slack). Sample ids: "
        f"{', '.join(found.sample_ids) or '(none)'}. Run session_cleanup_job or look at why "
        "its last runs did not clean these rows."
    )
    try:
        post_alert(text, context.log)
    except (OSError, ValueError) as exc:
        # The check's result is the record that matters; a broken webhook must not lose it.
        context.log.error("could not post the failed check's alert: %s", exc)
        return f"failed to post: {type(exc).__name__}"
    return "posted"


@dg.asset_check(asset=asset_key(t.SESSIONS))
def no_overdue_open_sessions(
    context: dg.AssetCheckExecutionContext, config: OpenSessionsCheckConfig, app_db: AppDatabase
) -> dg.AssetCheckResult:
    """No open session expired more than max_overdue_hours (24) ago."""
    return evaluate(
        context,
        app_db,
        "expire_sessions",
        config,
        slack=timedelta(hours=config.max_overdue_hours),
        what="open sessions expired too long ago",
    )


@dg.asset_check(asset=asset_key(t.DECLINES))
def no_declines_past_retention(
    context: dg.AssetCheckExecutionContext, config: OldDeclinesCheckConfig, app_db: AppDatabase
) -> dg.AssetCheckResult:
    """No decline older than the retention plus slack_hours (default 24)."""
    return evaluate(
        context,
        app_db,
        "purge_declines",
        config,
        slack=timedelta(hours=config.slack_hours),
        retention=timedelta(days=config.retention_days),
        what="declines past retention",
    )


@dg.asset_check(asset=asset_key(t.FINGERPRINTS))
def no_old_orphan_fingerprints(
    context: dg.AssetCheckExecutionContext,
    config: OrphanFingerprintsCheckConfig,
    app_db: AppDatabase,
) -> dg.AssetCheckResult:
    """No orphan fingerprint older than the grace plus slack_hours (default 24)."""
    return evaluate(
        context,
        app_db,
        "remove_orphan_fingerprints",
        config,
        slack=timedelta(hours=config.slack_hours),
        grace=timedelta(minutes=config.grace_minutes),
        what="orphan fingerprints past the grace",
    )


CHECKS = [no_overdue_open_sessions, no_declines_past_retention, no_old_orphan_fingerprints]

checks_job = dg.define_asset_job(
    CHECKS_JOB,
    selection=dg.AssetSelection.checks(*CHECKS),
    description="The cleanup's SLO checks on the three tables; read-only, safe at any time.",
)


def build_sensors(cleanup_job: dg.JobDefinition) -> list[dg.SensorDefinition]:
    """Sensors that launch the checks once ``cleanup_job`` has succeeded or failed."""
    sensors: list[dg.SensorDefinition] = []
    for status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE):

        @dg.run_status_sensor(
            name=f"session_cleanup_checks_after_{status.value.lower()}",
            run_status=status,
            monitored_jobs=[cleanup_job],
            request_job=checks_job,
            default_status=dg.DefaultSensorStatus.RUNNING,
            description=f"Runs the SLO checks after each {status.value.lower()} cleanup run.",
        )
        def after_cleanup(context: dg.RunStatusSensorContext) -> dg.RunRequest:
            run_id = context.dagster_run.run_id
            # run_key = the cleanup run: a sensor tick seen twice never checks it twice.
            return dg.RunRequest(run_key=run_id, tags={"session_cleanup/after_run": run_id})

        sensors.append(after_cleanup)
    return sensors
