"""``session_cleanup_dry_run_job``: the launchpad's one-click dry run.

Dagster 1.x has no presets for op jobs, so the dry run is a second job over the same three
ops whose config mapping always sets ``dry_run: true``. Its launchpad opens on a complete,
valid config (every field has a default), so "Launch run" is the one click; no field can make
it a real run. No ``from __future__ import annotations`` here: Dagster reads the config
mapping's ``DryRunConfig`` annotation at definition time.
"""

from typing import Any

import dagster as dg
from pydantic import Field

from session_cleanup_dagster.contract import GRACE_MINUTES, RETENTION_DAYS
from session_cleanup_dagster.jobs import RUN_TAGS
from session_cleanup_dagster.ops import expire_sessions, purge_declines, remove_orphan_fingerprints


class DryRunConfig(dg.Config):  # type: ignore[misc]
    """The dry-run job's config: one set of knobs for all three steps; dry_run is always on."""

    as_of: str | None = Field(
        default=None,
        description="Cutoff instant T (ISO 8601 with Z or an offset). Empty: the database's now().",
    )
    batch_size: int = Field(default=1000, description="Rows per batch (1 to 50000).")
    retention_days: int = Field(
        default=RETENTION_DAYS, description="purge_declines: keep this many days."
    )
    grace_minutes: int = Field(
        default=GRACE_MINUTES,
        description="remove_orphan_fingerprints: spare orphans younger than this.",
    )


@dg.config_mapping
def _always_dry(config: DryRunConfig) -> dict[str, Any]:
    common = {"as_of": config.as_of, "batch_size": config.batch_size, "dry_run": True}
    return {
        "ops": {
            "expire_sessions": {"config": common},
            "purge_declines": {"config": {**common, "retention_days": config.retention_days}},
            "remove_orphan_fingerprints": {
                "config": {**common, "grace_minutes": config.grace_minutes}
            },
        }
    }


def build_dry_run_job() -> dg.JobDefinition:
    """``session_cleanup_dry_run_job``: the same three ops with ``dry_run`` forced on.

    The launchpad's default config is a complete dry run, so "Launch run" is the one click;
    no field can turn it into a real run. Unpartitioned: T is ``as_of`` or the database's now.
    """

    @dg.job(
        name="session_cleanup_dry_run_job",
        description=(
            "Dry run of session_cleanup_job: counts what each step would change and shows "
            "sample ids; changes nothing. Launch it with the default config."
        ),
        config=_always_dry,
        executor_def=dg.in_process_executor,
        # The queue admits one run with the exclusive tag at a time: a dry run launched
        # beside a real one waits QUEUED instead of holding a run slot while it waits for
        # the advisory lock (and failing after lock_wait_s).
        tags={**RUN_TAGS, "session_cleanup/dry_run": "true"},
    )
    def session_cleanup_dry_run_job() -> None:
        expire_sessions()
        purge_declines()
        remove_orphan_fingerprints()

    return session_cleanup_dry_run_job
