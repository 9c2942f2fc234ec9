"""How many rows still match each step's condition: the backlog a run leaves behind.

After a clean run this is zero, except rows the app held locked (they are skipped and left
for the next run). The counts are plain ``count(*)`` queries with the steps' own conditions.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa

from session_cleanup_dagster import tables as t


def backlog(
    engine: sa.Engine,
    cutoff: datetime,
    *,
    retention: timedelta = timedelta(days=7),
    grace: timedelta = timedelta(hours=1),
    schema: str = "public",
) -> dict[str, int]:
    """Rows each step would still change at ``cutoff``, keyed by step name."""
    tables = t.reflect(schema)
    s, d, f = tables.sessions, tables.declines, tables.fingerprints
    queries = {
        "expire_sessions": sa.select(sa.func.count())
        .select_from(s)
        .where(s.c.ended_at.is_(None), s.c.expires_at < cutoff),
        "purge_declines": sa.select(sa.func.count())
        .select_from(d)
        .where(d.c.created_at < cutoff - retention),
        "remove_orphan_fingerprints": sa.select(sa.func.count())
        .select_from(f)
        .where(
            f.c.session_id.is_not(None),
            f.c.created_at < cutoff - grace,
            ~sa.exists().where(s.c.id == f.c.session_id),
        ),
    }
    with engine.connect() as conn:
        return {step: int(conn.execute(query).scalar_one()) for step, query in queries.items()}
