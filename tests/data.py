"""Small hand-made datasets with every boundary of the contract, relative to a cutoff T."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from session_cleanup_dev.seed import seed_database

from tests import pg

T = datetime(2026, 11, 28, 4, 0, tzinfo=UTC)
DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
SECOND = timedelta(seconds=1)
MICRO = timedelta(microseconds=1)


def seed(url: str, users: int, anchor: datetime | None = T) -> pg.Snapshot:
    """Seed ``users`` users' synthetic rows (session-cleanup seed's) into the existing schema.

    Returns the whole state afterwards. ``anchor=None``: the data is relative to now.
    """
    engine = pg.engine(url)
    try:
        seed_database(engine, users, anchor=anchor, create_schema=False)
    finally:
        engine.dispose()
    return pg.snapshot(url)


def uid(n: int) -> uuid.UUID:
    """A readable, stable uuid: 00000000-0000-0000-0000-<n>."""
    return uuid.UUID(int=n)


def insert_user(url: str, user_id: str) -> None:
    pg.execute(url, "INSERT INTO users (id, created_at) VALUES (%s, %s)", (user_id, T - 30 * DAY))


def insert_session(
    url: str,
    session_id: uuid.UUID,
    user_id: str,
    expires_at: datetime,
    ended_at: datetime | None = None,
) -> None:
    pg.execute(
        url,
        "INSERT INTO after_hours_sessions (id, user_id, started_at, expires_at, ended_at,"
        " latitude, longitude, fuzzed_latitude, fuzzed_longitude, created_at)"
        " VALUES (%s, %s, %s, %s, %s, 52.52000660, 13.40495400, 52.52100000, 13.40500000, %s)",
        (session_id, user_id, expires_at - 2 * HOUR, expires_at, ended_at, expires_at - 2 * HOUR),
    )


def insert_decline(
    url: str,
    decline_id: uuid.UUID,
    session_id: uuid.UUID,
    user: str,
    declined: str,
    created_at: datetime | None,
) -> None:
    pg.execute(
        url,
        "INSERT INTO after_hours_declines (id, session_id, user_id, declined_user_id,"
        " created_at, decline_count, first_declined_at, last_session_id)"
        " VALUES (%s, %s, %s, %s, %s, 2, %s, %s)",
        (decline_id, session_id, user, declined, created_at, created_at, session_id),
    )


def insert_fingerprint(
    url: str,
    fp_id: uuid.UUID,
    session_id: uuid.UUID | None,
    created_at: datetime,
    user_id: str | None = "u1",
) -> None:
    pg.execute(
        url,
        "INSERT INTO device_fingerprints (id, user_id, session_id, fingerprint_hash, created_at)"
        " VALUES (%s, %s, %s, %s, %s)",
        (fp_id, user_id, session_id, f"hash-{fp_id}", created_at),
    )


def boundaries(url: str) -> None:
    """One row on each side of every boundary, plus rows no rule may touch."""
    for user in ("u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8"):
        insert_user(url, user)
    # Sessions (one open per user): expired, exactly at T, future, already ended.
    insert_session(url, uid(101), "u1", T - SECOND)  # expires -> ended_at = expires_at
    insert_session(url, uid(102), "u2", T)  # expires_at == T: not before T, stays open
    insert_session(url, uid(103), "u3", T + DAY)  # in the future: stays open
    insert_session(url, uid(104), "u4", T - 3 * DAY, ended_at=T - 4 * DAY)  # ended: untouched
    insert_session(url, uid(105), "u4", T - 10 * DAY)  # expired long ago -> ended
    insert_session(url, uid(106), "u5", T - MICRO)  # one microsecond before T -> ended
    insert_session(url, uid(107), "u6", T - 2 * DAY, ended_at=T - 2 * DAY)
    # Declines around T - 7 days.
    cutoff = T - 7 * DAY
    insert_decline(url, uid(201), uid(101), "u1", "u2", cutoff - MICRO)  # purged
    insert_decline(url, uid(202), uid(101), "u1", "u3", cutoff)  # exactly at: kept
    insert_decline(url, uid(203), uid(102), "u2", "u1", cutoff + SECOND)  # kept
    insert_decline(url, uid(204), uid(103), "u3", "u1", T - 30 * DAY)  # purged
    insert_decline(url, uid(205), uid(103), "u3", "u2", None)  # NULL created_at: kept
    insert_decline(url, uid(206), uid(104), "u4", "u5", T)  # kept
    # Fingerprints: orphans around T - 1 hour, NULL session, live session.
    insert_fingerprint(url, uid(301), uid(9001), T - HOUR - MICRO)  # orphan, old: deleted
    insert_fingerprint(url, uid(302), uid(9002), T - HOUR)  # orphan at grace edge: kept
    insert_fingerprint(url, uid(303), uid(9003), T - 10 * MICRO)  # orphan inside grace: kept
    insert_fingerprint(url, uid(304), None, T - 30 * DAY)  # no session: kept
    insert_fingerprint(url, uid(305), uid(101), T - 30 * DAY)  # session exists: kept
    insert_fingerprint(url, uid(306), uid(104), T - 30 * DAY, user_id=None)  # ended session: kept
    insert_fingerprint(url, uid(307), uid(9004), T - 400 * DAY, user_id=None)  # orphan: deleted
