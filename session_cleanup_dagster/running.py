"""What every op does around its SQL function: validate, resolve T, check, run, report.

Errors leave here sorted. Transient database errors are raised as TransientDatabaseError and
the op's RetryPolicy retries them. Everything else becomes ``dagster.Failure`` with
``allow_retries=False``: bad config, a missing table, column, index or privilege, bad
credentials, the safety cap. A retry would only fail the same way, later.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import dagster as dg
import sqlalchemy as sa
import sqlalchemy.exc

from session_cleanup_dagster import errors, prerequisites, steps
from session_cleanup_dagster.config import CleanupConfig
from session_cleanup_dagster.cutoff import resolve_cutoff
from session_cleanup_dagster.resources import AppDatabase

PROGRESS_EVERY_S = 5.0
# Reading the run's status is a query on Dagster's run storage: once per batch it cost more
# than the batches themselves (measured in benchmarks/). A cancel is still seen within this
# long plus one batch; a terminated run worker interrupts the batch itself at once.
CANCEL_CHECK_EVERY_S = 0.5

RETRY_POLICY = dg.RetryPolicy(
    max_retries=3,
    delay=2,
    backoff=dg.Backoff.EXPONENTIAL,
    jitter=dg.Jitter.PLUS_MINUS,
)

StepFunction = Callable[..., steps.StepResult]


def run_step(
    context: dg.OpExecutionContext,
    config: CleanupConfig,
    app_db: AppDatabase,
    step: StepFunction,
    **step_kwargs: Any,
) -> dg.Output[None]:
    """Run one cleanup step for this op and return its output with metadata."""
    name = context.op.name
    problems = config.problems()
    if problems:
        raise dg.Failure(
            description=f"{name}: invalid run config, nothing was done. " + " ".join(problems),
            allow_retries=False,
        )
    where = f"{name} on {app_db.describe()}"
    secrets = [app_db.password()]
    try:
        engine = app_db.get_engine()
        cutoff, source = resolve_cutoff(context, config, lambda: steps.database_now(engine))
        with engine.connect() as conn:
            prerequisites.check(conn, name, app_db.db_schema)
        context.log.info(
            "%s: cutoff %s (from %s), batch_size %d, dry_run %s",
            name,
            cutoff.isoformat(),
            source,
            config.batch_size,
            config.dry_run,
        )
        result = step(
            engine,
            cutoff,
            config.step_options(),
            schema=app_db.db_schema,
            before_batch=_before_batch(context),
            **step_kwargs,
        )
    except steps.SafetyCapExceeded as exc:
        raise dg.Failure(
            description=str(exc),
            metadata={
                "rows_changed": exc.changed,
                "next_batch": exc.next_batch,
                "max_rows": exc.max_rows,
            },
            allow_retries=False,
        ) from None
    except (errors.ConfigError, errors.PermanentDatabaseError, ValueError) as exc:
        raise dg.Failure(
            description=errors.redact(str(exc), secrets), allow_retries=False
        ) from None
    except (sqlalchemy.exc.DBAPIError, errors.TransientDatabaseError) as exc:
        message = errors.explain(exc, where=where, secrets=secrets)
        if errors.is_transient(exc):
            context.log.warning("%s", message)
            raise errors.TransientDatabaseError(message) from None
        raise dg.Failure(description=message, allow_retries=False) from None
    except sa.exc.ArgumentError as exc:
        raise dg.Failure(
            description=errors.redact(f"{where}: {exc}", secrets), allow_retries=False
        ) from None
    verb = "would change" if result.dry_run else "changed"
    context.log.info(
        "%s: %s %d rows in %d batches, %.2f s (%.0f rows/s)%s",
        name,
        verb,
        result.changed,
        result.batches,
        result.duration_s,
        result.rows_per_second,
        f"; sample ids: {', '.join(result.sample_ids)}" if result.dry_run else "",
    )
    return dg.Output(None, metadata=_metadata(result, source))


def _metadata(result: steps.StepResult, source: str) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "rows_changed": 0 if result.dry_run else result.changed,
        "rows_matched": result.changed,
        "batches": result.batches,
        "cutoff": dg.MetadataValue.timestamp(result.cutoff),
        "cutoff_iso": result.cutoff.isoformat(),
        "cutoff_source": source,
        "duration_s": round(result.duration_s, 3),
        "rows_per_s": round(result.rows_per_second, 1),
        "dry_run": result.dry_run,
    }
    if result.dry_run:
        metadata["sample_ids"] = ", ".join(result.sample_ids) or "(none)"
    return metadata


def _before_batch(context: dg.OpExecutionContext) -> steps.BeforeBatch:
    """Log progress at most every 5 s, and stop before a batch once a cancel is requested."""
    last_log = time.monotonic()
    last_check = -CANCEL_CHECK_EVERY_S

    def hook(progress: steps.Progress) -> None:
        nonlocal last_log, last_check
        now = time.monotonic()
        if now - last_check < CANCEL_CHECK_EVERY_S:
            run = None
        else:
            last_check = now
            run = context.instance.get_run_by_id(context.run_id)
        if run is not None and run.status in (
            dg.DagsterRunStatus.CANCELING,
            dg.DagsterRunStatus.CANCELED,
        ):
            context.log.warning(
                "%s: run is being canceled; stopping before batch %d (%d rows done, every "
                "committed batch is complete)",
                progress.step,
                progress.batches + 1,
                progress.changed,
            )
            raise dg.DagsterExecutionInterruptedError()
        if now - last_log >= PROGRESS_EVERY_S:
            last_log = now
            context.log.info("%s", describe_progress(progress))

    return hook


def describe_progress(progress: steps.Progress) -> str:
    """One progress line: rows done, rate, and time left from the walk's position."""
    rate = progress.changed / progress.elapsed if progress.elapsed > 0 else 0.0
    line = (
        f"{progress.step}: {progress.changed} rows in {progress.batches} batches, {rate:.0f} rows/s"
    )
    if progress.total_units and progress.done_units:
        fraction = min(1.0, progress.done_units / progress.total_units)
        left = progress.elapsed * (1 - fraction) / fraction if fraction > 0 else 0.0
        estimate = (
            "counted from the partial index on open sessions"
            if progress.unit == "rows"
            else "from the table's size in pages at the start"
        )
        line += (
            f", {fraction:.0%} of {progress.total_units} {progress.unit} "
            f"({estimate}), about {left:.0f} s left"
        )
    return line
