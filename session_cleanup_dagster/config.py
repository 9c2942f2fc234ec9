"""Run config for the three ops: one shared base, and each step's own knobs.

Every field has a safe default, so the launchpad's default config is a valid real run and a
dry run is one toggle. ``problems()`` lists what is invalid in an operator's words; the ops
call it before touching the database.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg
from pydantic import Field

from session_cleanup_dagster.contract import GRACE_MINUTES, RETENTION_DAYS
from session_cleanup_dagster.steps import StepOptions

MAX_BATCH_SIZE = 50_000
# Transient database errors: each op retries 3 times, waiting retry_delay_s, then twice and
# four times that (each +-50 % jitter). At most 5 s, so the longest wait (4 x 1.5 x 5 = 30 s)
# plus a connection attempt stays inside the stuck-run sensor's grace (docs/operations.md).
MAX_RETRIES = 3
RETRY_DELAY_S = 2.0
MAX_RETRY_DELAY_S = 5.0


def parse_instant(value: str) -> datetime:
    """Parse an ISO 8601 instant that names its offset (``Z`` or ``+hh:mm``), as UTC.

    Raises:
        ValueError: naming the value and the accepted form.
    """
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f"as_of {value!r} is not an ISO 8601 instant; write it like "
            "2026-11-28T04:00:00Z or 2026-11-28T05:00:00+01:00."
        ) from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise ValueError(
            f"as_of {value!r} has no timezone, so it could mean any of 24 instants; add Z "
            "(UTC) or an offset such as +01:00."
        )
    return parsed.astimezone(UTC)


class CleanupConfig(dg.Config):  # type: ignore[misc]
    """Settings every step shares."""

    as_of: str | None = Field(
        default=None,
        description=(
            "Cutoff instant T (ISO 8601 with Z or an offset). Ignored by partitioned runs, "
            "which use their partition's end (04:00 UTC the day after). Empty: the database's "
            "now() when the run starts."
        ),
    )
    dry_run: bool = Field(
        default=False,
        description="Count what would change and show sample ids; change nothing.",
    )
    batch_size: int = Field(
        default=50_000,
        description=(
            f"Most rows per batch (1 to {MAX_BATCH_SIZE}); each batch is one transaction. "
            "Below this, batches are sized by target_batch_ms. (remove_orphan_fingerprints "
            "counts fingerprints walked, and a batch also takes the rest of its last session's.)"
        ),
    )
    target_batch_ms: int = Field(
        default=100,
        description=(
            "Size batches so each takes about this long (10 to 10000 ms); 0: fixed batches of "
            "batch_size rows."
        ),
    )
    max_rows: int | None = Field(
        default=None,
        description=(
            "Safety cap: stop and fail before this step changes more rows than this. Empty: no cap."
        ),
    )
    retry_delay_s: float = Field(
        default=RETRY_DELAY_S,
        description=(
            f"First wait before retrying a transient database error (0.1 to {MAX_RETRY_DELAY_S:g} "
            f"s); it doubles for each of the {MAX_RETRIES} retries, each +-50 % jitter."
        ),
    )

    def problems(self) -> list[str]:
        """What is invalid, one sentence each; empty when the config is fine."""
        found = []
        if self.as_of is not None and self.as_of.strip():
            try:
                parse_instant(self.as_of)
            except ValueError as exc:
                found.append(str(exc))
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            found.append(f"batch_size is {self.batch_size}; use 1 to {MAX_BATCH_SIZE}.")
        if self.target_batch_ms != 0 and not 10 <= self.target_batch_ms <= 10_000:
            found.append(
                f"target_batch_ms is {self.target_batch_ms}; use 10 to 10000, or 0 for fixed "
                "batches of batch_size rows."
            )
        if self.max_rows is not None and self.max_rows < 1:
            found.append(
                f"max_rows is {self.max_rows}; use a positive number, or leave it empty for no cap."
            )
        if not 0.1 <= self.retry_delay_s <= MAX_RETRY_DELAY_S:
            found.append(
                f"retry_delay_s is {self.retry_delay_s:g}; use 0.1 to {MAX_RETRY_DELAY_S:g} s."
            )
        return found

    def as_of_instant(self) -> datetime | None:
        """The parsed ``as_of``, or None when unset."""
        if self.as_of is None or not self.as_of.strip():
            return None
        return parse_instant(self.as_of)

    def step_options(self) -> StepOptions:
        """The settings the SQL functions take."""
        return StepOptions(
            batch_size=self.batch_size,
            dry_run=self.dry_run,
            max_rows=self.max_rows,
            target_batch_ms=self.target_batch_ms or None,
        )


class ExpireSessionsConfig(CleanupConfig):  # type: ignore[misc]
    """``expire_sessions``: end open sessions whose ``expires_at`` is before T."""


class PurgeDeclinesConfig(CleanupConfig):  # type: ignore[misc]
    """``purge_declines``: delete declines created before T minus the retention."""

    retention_days: int = Field(
        default=RETENTION_DAYS, description="Keep declines this many days (1 to 3650)."
    )

    def problems(self) -> list[str]:
        found = super().problems()
        if not 1 <= self.retention_days <= 3650:
            found.append(f"retention_days is {self.retention_days}; use 1 to 3650 days.")
        return found

    @property
    def retention(self) -> timedelta:
        return timedelta(days=self.retention_days)


class RemoveOrphanFingerprintsConfig(CleanupConfig):  # type: ignore[misc]
    """``remove_orphan_fingerprints``: delete fingerprints whose session no longer exists."""

    grace_minutes: int = Field(
        default=GRACE_MINUTES,
        description=(
            "Spare orphans younger than this (1 to 10080), so a fingerprint whose session "
            "insert has not committed yet survives."
        ),
    )

    def problems(self) -> list[str]:
        found = super().problems()
        if not 1 <= self.grace_minutes <= 10080:
            found.append(f"grace_minutes is {self.grace_minutes}; use 1 to 10080 (one week).")
        return found

    @property
    def grace(self) -> timedelta:
        return timedelta(minutes=self.grace_minutes)
