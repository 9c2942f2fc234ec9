"""A pure-Python model of the cleanup contract (DESIGN.md), to compare real runs against.

Given the whole state before and the cutoff T, it returns the whole state the three steps
must leave. Tests compare the database to it row by row, every column of every table.
"""

from __future__ import annotations

import copy
from datetime import datetime, timedelta

from tests.pg import Snapshot

RETENTION = timedelta(days=7)
GRACE = timedelta(hours=1)


def expire_sessions(state: Snapshot, cutoff: datetime) -> Snapshot:
    after = copy.deepcopy(state)
    for row in after["after_hours_sessions"]:
        if row["ended_at"] is None and row["expires_at"] < cutoff:
            row["ended_at"] = row["expires_at"]
    return after


def purge_declines(state: Snapshot, cutoff: datetime, retention: timedelta = RETENTION) -> Snapshot:
    after = copy.deepcopy(state)
    after["after_hours_declines"] = [
        row
        for row in after["after_hours_declines"]
        if not (row["created_at"] is not None and row["created_at"] < cutoff - retention)
    ]
    return after


def remove_orphan_fingerprints(
    state: Snapshot, cutoff: datetime, grace: timedelta = GRACE
) -> Snapshot:
    after = copy.deepcopy(state)
    sessions = {row["id"] for row in after["after_hours_sessions"]}
    after["device_fingerprints"] = [
        row
        for row in after["device_fingerprints"]
        if not (
            row["session_id"] is not None
            and row["session_id"] not in sessions
            and row["created_at"] is not None
            and row["created_at"] < cutoff - grace
        )
    ]
    return after


def cleanup(
    state: Snapshot,
    cutoff: datetime,
    retention: timedelta = RETENTION,
    grace: timedelta = GRACE,
) -> Snapshot:
    """All three steps (they commute: none changes what another one reads)."""
    state = expire_sessions(state, cutoff)
    state = purge_declines(state, cutoff, retention)
    return remove_orphan_fingerprints(state, cutoff, grace)


def delete_session(state: Snapshot, session_id: object) -> Snapshot:
    """What the app's ``DELETE FROM after_hours_sessions`` does: its declines cascade away.

    Fingerprints have no foreign key, so theirs stay (and become orphans).
    """
    after = copy.deepcopy(state)
    after["after_hours_sessions"] = [
        row for row in after["after_hours_sessions"] if row["id"] != session_id
    ]
    after["after_hours_declines"] = [
        row for row in after["after_hours_declines"] if row["session_id"] != session_id
    ]
    return after


def rows_changed(before: Snapshot, after: Snapshot, table: str) -> int:
    """How many rows of ``table`` differ (changed or gone) between two states."""
    remaining = {row["id"]: row for row in after[table]}
    return sum(1 for row in before[table] if remaining.get(row["id"]) != row)
