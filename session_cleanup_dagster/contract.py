"""The cleanup contract's two defaults (DESIGN.md). Everything else refers to these."""

from __future__ import annotations

from datetime import timedelta

RETENTION = timedelta(days=7)
"""``purge_declines`` deletes declines created before the cutoff minus this."""

GRACE = timedelta(hours=1)
"""``remove_orphan_fingerprints`` spares orphans created after the cutoff minus this."""

RETENTION_DAYS = RETENTION.days
GRACE_MINUTES = int(GRACE.total_seconds() // 60)


def describe(delta: timedelta) -> str:
    """``7 days``, ``1 hour``: a default as the docs and descriptions say it."""
    if delta.days and not delta.seconds:
        return f"{delta.days} day" + ("s" if delta.days != 1 else "")
    hours = int(delta.total_seconds() // 3600)
    return f"{hours} hour" + ("s" if hours != 1 else "")
