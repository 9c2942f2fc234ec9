"""The three ops. Each is config in, one SQL function, metadata out; see op_runner.py.

They have no RetryPolicy on purpose: op_runner.py retries transient database errors itself
(RetryRequested), because Dagster turns an interrupt into a retry under a RetryPolicy.
"""

import dagster as dg

from session_cleanup_dagster import steps
from session_cleanup_dagster.config import (
    ExpireSessionsConfig,
    PurgeDeclinesConfig,
    RemoveOrphanFingerprintsConfig,
)
from session_cleanup_dagster.op_runner import run_step
from session_cleanup_dagster.resources import AppDatabase

_TAGS = {"kind": "postgres"}


@dg.op(tags=_TAGS)
def expire_sessions(
    context: dg.OpExecutionContext, config: ExpireSessionsConfig, app_db: AppDatabase
) -> dg.Output[None]:
    """End every open session whose expires_at is before T (ended_at = expires_at)."""
    return run_step(context, config, app_db, steps.expire_sessions)


@dg.op(tags=_TAGS)
def purge_declines(
    context: dg.OpExecutionContext, config: PurgeDeclinesConfig, app_db: AppDatabase
) -> dg.Output[None]:
    """Delete declines created before T minus the retention (contract.RETENTION by default)."""
    return run_step(context, config, app_db, steps.purge_declines, retention=config.retention)


# Runs first (the in-process executor starts higher priorities first): it probes the
# sessions' primary key, and once expire_sessions has rewritten many session rows (a
# backlog), most of those probes must also read a heap page to check visibility. Measured
# at L: 7.8 s before expire_sessions, 11.5 s after it (benchmarks/README.md).
@dg.op(tags={**_TAGS, "dagster/priority": "1"})
def remove_orphan_fingerprints(
    context: dg.OpExecutionContext,
    config: RemoveOrphanFingerprintsConfig,
    app_db: AppDatabase,
) -> dg.Output[None]:
    """Delete fingerprints whose session is gone, older than T minus the grace period."""
    return run_step(context, config, app_db, steps.remove_orphan_fingerprints, grace=config.grace)
