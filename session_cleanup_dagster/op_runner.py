"""What every op does around its SQL function: validate, resolve T, check, run, report.

Errors leave here sorted. Transient database errors are retried: ``dagster.RetryRequested``
(3 retries, exponential backoff from the config's ``retry_delay_s``, 2 s by default) caused
by a TransientDatabaseError.
Not a ``RetryPolicy``: Dagster turns an interrupt inside an op that has a RetryPolicy into a
retry, so a terminated run would re-run each op (waiting out the backoff) before ending
CANCELED; measured, 24 s instead of under 1 s. Everything else becomes ``dagster.Failure`` with
``allow_retries=False``: bad config, a missing table, column, index or privilege, bad
credentials, the safety cap. A retry would only fail the same way, later.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from typing import Any

import dagster as dg
import psycopg
import sqlalchemy as sa
import sqlalchemy.exc

from session_cleanup_dagster import (
    assets,
    errors,
    health,
    locking,
    prerequisites,
    safety_cap,
    steps,
    topology,
)
from session_cleanup_dagster.config import MAX_RETRIES, CleanupConfig
from session_cleanup_dagster.cutoff import resolve_cutoff
from session_cleanup_dagster.resources import AppDatabase

PROGRESS_EVERY_S = 5.0
# Reading the run's status is a query on Dagster's run storage: once per batch it cost more
# than the batches themselves (measured in benchmarks/). A cancel is still seen within this
# long plus one batch; a terminated run worker interrupts the batch itself at once.
CANCEL_CHECK_EVERY_S = 0.5


def retry_delay_s(first_s: float, retry_number: int) -> float:
    """Exponential backoff from ``first_s`` (2, 4, 8 s from 2 s), each with +-50 % jitter."""
    return float(first_s * 2**retry_number * random.uniform(0.5, 1.5))  # noqa: S311


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
    budget: safety_cap.RowBudget | None = None
    hold: health.ReplicaHold | None = None
    try:
        topology.check(
            app_db.database_url(),
            name,
            connect_timeout_s=app_db.connect_timeout_s,
            retrying=context.retry_number > 0,
        )
        lock = _take_lock(context, app_db)
        engine = app_db.get_engine()
        cutoff, source = resolve_cutoff(context, config, lambda: steps.database_now(engine))
        with engine.connect() as conn:
            for warning in prerequisites.check(conn, name, app_db.db_schema):
                context.log.warning("%s", warning)
        context.log.info(
            "%s: cutoff %s (from %s), batch_size %d, dry_run %s",
            name,
            cutoff.isoformat(),
            source,
            config.batch_size,
            config.dry_run,
        )
        hold = app_db.replica_hold(
            name,
            context.log,
            check_cancel=lambda: _stop_if_canceled(context, f"{name}: run canceled while holding"),
        )
        options = config.step_options()
        if options.max_rows is not None and not options.dry_run:
            budget = safety_cap.RowBudget(context, name, options.max_rows)
            options = dataclasses.replace(options, changed_before=budget.changed_before)
        try:
            result = step(
                engine,
                cutoff,
                options,
                schema=app_db.db_schema,
                before_batch=_before_batch(context, lock, budget, hold),
                **step_kwargs,
            )
        except steps.SafetyCapExceeded as exc:
            if budget is not None:
                budget.settle(exc.changed - budget.changed_before)
            raise
        except Exception as exc:
            if budget is not None:
                budget.failed(exc)
            raise
        if budget is not None:
            budget.settle(result.changed)
        assets.report_step(context, engine, app_db.db_schema, result, source, **step_kwargs)
        # The last batch may have committed after a cancel (or a forced CANCELED) arrived:
        # end the op interrupted, so a canceled run never turns SUCCESS (dagster#34175).
        _stop_if_canceled(context, f"{name}: run is being canceled after its last batch")
    except (locking.LockNotAcquired, locking.LockLost) as exc:
        raise dg.Failure(description=f"{name}: {exc}", allow_retries=False) from None
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
    except (sqlalchemy.exc.DBAPIError, psycopg.Error, errors.TransientDatabaseError) as exc:
        message = errors.explain(exc, where=where, secrets=secrets)
        if errors.is_transient(exc):
            context.log.warning("%s", message)
            if errors.sqlstate(exc) == "25006" or isinstance(exc, errors.TransientDatabaseError):
                # A failover: the connections lead to a standby now. Start afresh, so the
                # retry reaches whatever the URL's host leads to then.
                app_db.reconnect()
            raise dg.RetryRequested(
                max_retries=MAX_RETRIES,
                seconds_to_wait=retry_delay_s(config.retry_delay_s, context.retry_number),
            ) from errors.TransientDatabaseError(message)
        raise dg.Failure(description=message, allow_retries=False) from None
    except sa.exc.ArgumentError as exc:
        raise dg.Failure(
            description=errors.redact(f"{where}: {exc}", secrets), allow_retries=False
        ) from None
    finally:
        if hold is not None:
            hold.close()
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
    metadata = _metadata(result, source)
    metadata["replica_hold_s"] = round(hold.held_s, 1)
    return dg.Output(None, metadata=metadata)


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


# A run in one of these states must not start another batch. FAILURE and SUCCESS too: a
# worker that the stuck-run sensor marked failed (say, cut off from the database for a while)
# stops as soon as it sees that, instead of working on beside its retry.
_STOP_STATUSES = (
    dg.DagsterRunStatus.CANCELING,
    dg.DagsterRunStatus.CANCELED,
    dg.DagsterRunStatus.FAILURE,
    dg.DagsterRunStatus.SUCCESS,
)


def _stop_if_canceled(context: dg.OpExecutionContext, message: str) -> None:
    run = context.instance.get_run_by_id(context.run_id)
    if run is not None and run.status in _STOP_STATUSES:
        context.log.warning("%s (run status %s)", message, run.status.value)
        raise dg.DagsterExecutionInterruptedError()


def _take_lock(context: dg.OpExecutionContext, app_db: AppDatabase) -> locking.RunLock:
    """Take the run's cleanup lock (the first op does; later ones find it held)."""
    lock = app_db.run_lock(context.run_id)
    if lock.held:
        return lock

    def waiting(holders: list[locking.Holder], waited: float) -> None:
        context.log.warning(
            "%s: waiting for the cleanup lock (%.0f s of at most %d s); held by %s",
            context.op.name,
            waited,
            app_db.lock_wait_s,
            ", ".join(h.describe() for h in holders) or "nobody now",
        )

    lock.acquire(
        app_db.lock_wait_s,
        on_wait=waiting,
        check=lambda: _stop_if_canceled(context, "run canceled while waiting for the lock"),
    )
    context.log.info(
        "%s: holding the cleanup lock (advisory lock %d) as '%s'",
        context.op.name,
        locking.LOCK_KEY,
        locking.application_name(context.run_id),
    )
    return lock


def _before_batch(
    context: dg.OpExecutionContext,
    lock: locking.RunLock,
    budget: safety_cap.RowBudget | None,
    hold: health.ReplicaHold,
) -> steps.BeforeBatch:
    """Log progress at most every 5 s; stop before a batch once a cancel is requested."""
    last_log = time.monotonic()
    last_check = -CANCEL_CHECK_EVERY_S

    def hook(progress: steps.Progress) -> None:
        nonlocal last_log, last_check
        now = time.monotonic()
        if now - last_check >= CANCEL_CHECK_EVERY_S:
            last_check = now
            _stop_if_canceled(
                context,
                f"{progress.step}: run is being canceled; stopping before batch "
                f"{progress.batches + 1} ({progress.changed} rows done, every committed batch "
                "is complete)",
            )
        # Cheap (one round trip on the lock's own connection), so before every batch.
        lock.ensure()
        hold.before_batch()
        if budget is not None:
            budget.before_batch(progress)
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
        left = progress.units_elapsed * (1 - fraction) / fraction if fraction > 0 else 0.0
        line += (
            f", {fraction:.0%} of {progress.total_units} {progress.unit} "
            f"({progress.basis}), about {left:.0f} s left"
        )
    return line
