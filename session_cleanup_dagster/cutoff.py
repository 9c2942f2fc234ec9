"""Where a run's cutoff instant T comes from (DESIGN.md, "The cleanup contract").

1. A partitioned run (scheduled or backfilled) of day D: the end of D's window, 04:00 UTC on
   the day after D.
2. Otherwise ``as_of`` from the op's config.
3. Otherwise the database's ``now()`` when the run starts. The first op to need it stores it
   as a run tag, so all three ops of a run (and a retry of that op) share one T.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

import dagster as dg

from session_cleanup_dagster.config import CleanupConfig, parse_instant

CUTOFF_TAG = "session_cleanup/cutoff"
CUTOFF_SOURCE_TAG = "session_cleanup/cutoff_source"
# How far a cutoff may be ahead of the database's clock and still be waited for.
MAX_CLOCK_SKEW_S = 300


def resolve_cutoff(
    context: dg.OpExecutionContext,
    config: CleanupConfig,
    database_now: Callable[[], datetime],
) -> tuple[datetime, str]:
    """The run's cutoff and where it came from: ``partition``, ``as_of`` or ``database_now``.

    Raises:
        ValueError: T would be more than MAX_CLOCK_SKEW_S in the future by the database's clock.
    """
    if context.has_partition_key:
        cutoff, source = context.partition_time_window.end, "partition"
    elif (as_of := config.as_of_instant()) is not None:
        cutoff, source = as_of, "as_of"
    elif (tagged := _database_now_tag(context)) is not None:
        return tagged, "database_now"
    else:
        cutoff, source = database_now(), "database_now"
    if source != "database_now":
        _wait_for_database_clock(context, cutoff, source, database_now)
    context.instance.add_run_tags(
        context.run_id, {CUTOFF_TAG: cutoff.isoformat(), CUTOFF_SOURCE_TAG: source}
    )
    return cutoff, source


def _wait_for_database_clock(
    context: dg.OpExecutionContext,
    cutoff: datetime,
    source: str,
    database_now: Callable[[], datetime],
) -> None:
    """Return once the database's clock has passed ``cutoff``, waiting out a small skew.

    A scheduled run's T is the 04:00 tick by the daemon's clock; a database clock a few
    seconds behind would otherwise fail every night. The wait is a plain sleep, which a
    terminate interrupts.

    Raises:
        ValueError: T is more than MAX_CLOCK_SKEW_S ahead of the database's clock.
    """
    now = database_now()
    if cutoff <= now:
        return
    ahead = (cutoff - now).total_seconds()
    if ahead > MAX_CLOCK_SKEW_S:
        raise ValueError(
            f"cutoff {cutoff.isoformat()} (from {source}) is in the future: the database "
            f"clock says {now.isoformat()}, {ahead:.0f} s earlier (more than the "
            f"{MAX_CLOCK_SKEW_S} s of clock skew this job waits out). A cleanup may only look "
            "at the past; use an earlier as_of, or wait until the partition's window has ended."
        )
    context.log.warning(
        "cutoff %s (from %s) is %.1f s ahead of the database's clock (%s): clock skew; "
        "waiting until the database's now() passes it",
        cutoff.isoformat(),
        source,
        ahead,
        now.isoformat(),
    )
    while now < cutoff:
        time.sleep(min(1.0, max(0.05, (cutoff - now).total_seconds())))
        now = database_now()


def _database_now_tag(context: dg.OpExecutionContext) -> datetime | None:
    # Read from storage, not context.run: an earlier op of this run may have added the tag.
    run = context.instance.get_run_by_id(context.run_id)
    tags = run.tags if run is not None else {}
    if tags.get(CUTOFF_SOURCE_TAG) != "database_now" or CUTOFF_TAG not in tags:
        return None
    return parse_instant(tags[CUTOFF_TAG])
