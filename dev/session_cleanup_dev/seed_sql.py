"""What the seeded data looks like, as SQL: four ``INSERT … SELECT`` statements.

All rows are generated inside PostgreSQL with ``generate_series``; every "random" value and
every uuid comes from PostgreSQL's built-in integer hash functions keyed by row number and
``seed``, so the data is a pure function of ``(users, seed, anchor)`` and nothing crosses the
wire but the SQL.

Shape per ``N`` users (all times relative to ``anchor``, the intended cleanup cutoff ``T``):

* ``users``: ``N`` rows, ids ``user_1`` .. ``user_N``.
* ``after_hours_sessions``: ``5N`` rows, five per user. Session 4 of each user is open
  (``ended_at is null``); it has expired (``expires_at < anchor``) for users with
  ``i % 4 != 0``, i.e. ``0.75N``, and expires in the future for the rest. Sessions 0-3 are
  closed with ``started_at <= ended_at <= expires_at < anchor``.
* ``after_hours_declines``: ``5N`` rows; user ``i`` declines five distinct other users, each
  decline pointing at a different one of user ``i``'s sessions. Declines 0-2 of each user
  (60 %) are older than seven days, 3-4 (40 %) are within the last seven days.
* ``device_fingerprints``: ``1.5N`` rows in blocks of 20: 4 orphans (20 %, a session id
  that does not exist), 1 with a NULL session id (5 %), 15 pointing at existing sessions.
  One orphan in 20 was created within the last hour (inside the grace period). About 10 %
  of rows have a NULL ``user_id``.

Boundary rows (with ``K = BOUNDARY_EVERY``): for users with ``i % K == 4`` the open session
has ``expires_at == anchor`` and decline 3 has ``created_at == anchor - 7 days``; in
fingerprint blocks ``b % 20 == 0`` orphan 1 has ``created_at == anchor - 1 hour``. A cleanup
with ``T == anchor`` must leave all of them alone. Their twins one microsecond earlier (open
session of users with ``i % K == 1``, decline 0 of the same users, orphan 2 of the same
blocks) must be cleaned, which catches ``<`` versus ``<=`` mistakes in both directions.
"""

from __future__ import annotations

from datetime import timedelta

__all__ = ["BOUNDARY_EVERY", "TINY", "inserts"]

BOUNDARY_EVERY = 400
"""One user in this many gets boundary rows (and one gets just-past-boundary rows)."""

TINY = timedelta(microseconds=1)
"""How far the just-past-boundary twins lie before their boundary."""

# How the SQL below makes "random" values. Every column draws from its own stream: the stream's
# seed is hashtextextended('<stream>', :seed), a constant the planner folds once per statement,
# and a row's value is hashint8extended(<row key>, <stream seed>). Integer hashing is several
# times cheaper than hashing concatenated strings or md5(), which matters at millions of rows.
# Masking the sign bit gives a non-negative bigint without abs(), which overflows on the
# minimum bigint.


def _rand(stream: str, key: str) -> str:
    """SQL for a non-negative pseudo-random bigint of row ``key`` in stream ``stream``."""
    return f"(hashint8extended({key}, hashtextextended('{stream}', :seed)) & 9223372036854775807)"


def _uuid(stream: str, key: str) -> str:
    """SQL for a pseudo-random uuid of row ``key``: two 64-bit hashes, hex-encoded."""
    return (
        f"encode(int8send(hashint8extended({key}, hashtextextended('{stream}_hi', :seed)))"
        f" || int8send(hashint8extended({key}, hashtextextended('{stream}_lo', :seed))),"
        " 'hex')::uuid"
    )


# Session j (0..4) of user i has key i * 5 + j. Declines and fingerprints derive the ids of the
# sessions they point at with the same expression, so no lookup is needed.
_FRAGMENTS: dict[str, str] = {
    "user_created": _rand("user_created", "i"),
    "session_id": _uuid("session", "i * 5 + j"),
    "s1": _rand("session_duration", "i * 5 + j"),
    "s2": _rand("session_latitude", "i * 5 + j"),
    "s3": _rand("session_longitude", "i * 5 + j"),
    "s4": _rand("session_start", "i * 5 + j"),
    "s5": _rand("session_fuzz_latitude", "i * 5 + j"),
    "s6": _rand("session_fuzz_longitude", "i * 5 + j"),
    "s7": _rand("session_end", "i * 5 + j"),
    "decline_id": _uuid("decline", "i * 5 + k"),
    "decline_session_id": _uuid("session", "i * 5 + k"),
    "decline_base": _rand("decline_base", "i"),
    "d1": _rand("decline_created", "i * 5 + k"),
    "d2": _rand("decline_count", "i * 5 + k"),
    "d3": _rand("decline_first", "i * 5 + k"),
    "fingerprint_id": _uuid("fingerprint", "f"),
    "orphan_session_id": _uuid("orphan", "f"),
    "linked_session_id": _uuid("session", "o.owner * 5 + r.h2 % 5"),
    "f1": _rand("fingerprint_created", "f"),
    "f2": _rand("fingerprint_session", "f"),
    "f3": _rand("fingerprint_user", "f"),
    "f4": _rand("fingerprint_hash", "f"),
}

# Templates: {schema} is the validated, quoted schema name and the other fields are the
# fragments above. Values (anchor, seed, sizes) are always bind parameters. Intervals are in
# hours or seconds, never days: timestamptz +- '1 day' follows DST in the session's TimeZone,
# and the data must not depend on the connection's settings.
USERS_SQL = """
INSERT INTO {schema}.users (id, created_at)
SELECT 'user_' || i,
       -- Every user exists well before any of their sessions (which go back at most 91 days).
       CAST(:anchor AS timestamptz) - interval '2400 hours'
           - interval '1 second' * ({user_created} % (365 * 86400))
FROM generate_series(1, CAST(:users AS bigint)) AS i
"""

SESSIONS_SQL = """
INSERT INTO {schema}.after_hours_sessions (
    id, user_id, started_at, expires_at, ended_at,
    latitude, longitude, fuzzed_latitude, fuzzed_longitude, created_at
)
SELECT {session_id},
       'user_' || i,
       t.started_at,
       t.expires_at,
       t.ended_at,
       p.lat,
       p.lon,
       p.lat + ((r.h5 % 2000001) - 1000000) * 0.00000001,
       p.lon + ((r.h6 % 2000001) - 1000000) * 0.00000001,
       t.started_at
FROM generate_series(1, CAST(:users AS bigint)) AS i
CROSS JOIN generate_series(0, 4) AS j
CROSS JOIN LATERAL (
    SELECT {s1} AS h1, {s2} AS h2, {s3} AS h3, {s4} AS h4, {s5} AS h5, {s6} AS h6,
           {s7} AS h7
) AS r
CROSS JOIN LATERAL (
    -- Sessions last 1 to 12 hours.
    SELECT interval '1 hour' * (1 + r.h1 % 12) AS duration,
           3600 * (1 + r.h1 % 12) AS duration_s,
           -- Latitude within +-80, longitude within +-179.9, 8 decimals as in the schema.
           ((r.h2 % 16000000001) - 8000000000) * 0.00000001 AS lat,
           ((r.h3 % 35980000001) - 17990000000) * 0.00000001 AS lon
) AS p
CROSS JOIN LATERAL (
    SELECT CASE
               -- Closed: started 1 to 91 days ago, so it ended before the anchor.
               WHEN j < 4 THEN CAST(:anchor AS timestamptz) - interval '24 hours'
                   - interval '1 second' * (r.h4 % (90 * 86400))
               -- Open, exactly at the boundary: expires_at == anchor is not expired.
               WHEN i % :every = 4 THEN CAST(:anchor AS timestamptz) - p.duration
               -- Open, one microsecond past the boundary: expired.
               WHEN i % :every = 1 THEN CAST(:anchor AS timestamptz) - p.duration - :tiny
               -- Open and expired 1 second to 30 days ago (users with i % 4 != 0: 75 %).
               WHEN i % 4 <> 0 THEN CAST(:anchor AS timestamptz) - p.duration
                   - interval '1 second' * (1 + r.h4 % (30 * 86400))
               -- Open and still running: started less than one duration ago.
               ELSE CAST(:anchor AS timestamptz) - interval '1 second' * (r.h4 % p.duration_s)
           END AS started_at
) AS s
CROSS JOIN LATERAL (
    SELECT s.started_at AS started_at,
           s.started_at + p.duration AS expires_at,
           -- Closed sessions ended somewhere between their start and their expiry.
           CASE
               WHEN j < 4 THEN s.started_at
                   + interval '1 second' * (r.h7 % (p.duration_s + 1))
           END AS ended_at
) AS t
"""

DECLINES_SQL = """
INSERT INTO {schema}.after_hours_declines (
    id, session_id, user_id, declined_user_id, created_at,
    decline_count, first_declined_at, last_session_id
)
SELECT {decline_id},
       x.session_id,
       'user_' || i,
       -- Offsets base .. base + 4 lie in [1, N - 1]: five distinct users, never user i.
       'user_' || ((i - 1 + b.base + k) % :users + 1),
       c.created_at,
       1 + r.h2 % 3,
       c.created_at - interval '1 second' * CASE WHEN r.h2 % 3 = 0 THEN 0
                                                 ELSE r.h3 % (30 * 86400) END,
       x.session_id
FROM generate_series(1, CAST(:users AS bigint)) AS i
CROSS JOIN generate_series(0, 4) AS k
CROSS JOIN LATERAL (SELECT 1 + {decline_base} % (:users - 5) AS base) AS b
CROSS JOIN LATERAL (SELECT {d1} AS h1, {d2} AS h2, {d3} AS h3) AS r
-- Decline k of user i was made during that user's session k.
CROSS JOIN LATERAL (SELECT {decline_session_id} AS session_id) AS x
CROSS JOIN LATERAL (
    SELECT CASE
               -- Exactly at the retention boundary: kept by a cleanup with T == anchor.
               WHEN k = 3 AND i % :every = 4 THEN CAST(:retention_cutoff AS timestamptz)
               -- One microsecond past it: purged.
               WHEN k = 0 AND i % :every = 1 THEN CAST(:retention_cutoff AS timestamptz) - :tiny
               -- Declines 0-2 (60 %): older than the retention, by 1 second to 83 days.
               WHEN k < 3 THEN CAST(:retention_cutoff AS timestamptz)
                   - interval '1 second' * (1 + r.h1 % (83 * 86400))
               -- Declines 3-4 (40 %): within the retention window, strictly after the cutoff.
               ELSE CAST(:anchor AS timestamptz)
                   - interval '1 second' * (r.h1 % (7 * 86400 - 1))
           END AS created_at
) AS c
"""

FINGERPRINTS_SQL = """
INSERT INTO {schema}.device_fingerprints (id, user_id, session_id, fingerprint_hash, created_at)
SELECT {fingerprint_id},
       CASE WHEN r.h3 % 10 = 0 THEN NULL ELSE 'user_' || o.owner END,
       CASE
           -- Orphans (4 in each block of 20): ids from a stream no session id comes from.
           WHEN f % 20 < 4 THEN {orphan_session_id}
           WHEN f % 20 = 4 THEN NULL
           ELSE {linked_session_id}
       END,
       encode(sha256(int8send(r.h4)), 'hex'),
       CASE
           -- Orphan inside the grace period (1 in 20 orphans): must survive.
           WHEN f % 20 = 0 AND (f / 20) % 5 = 0 THEN CAST(:anchor AS timestamptz)
               - interval '1 second' * (r.h1 % 3600)
           -- Orphan exactly at the grace boundary: must survive.
           WHEN f % 20 = 1 AND (f / 20) % 20 = 0 THEN CAST(:grace_cutoff AS timestamptz)
           -- Orphan one microsecond past the grace boundary: removed.
           WHEN f % 20 = 2 AND (f / 20) % 20 = 0 THEN CAST(:grace_cutoff AS timestamptz) - :tiny
           -- Other orphans: 1 second to 60 days older than the grace cutoff.
           WHEN f % 20 < 4 THEN CAST(:grace_cutoff AS timestamptz)
               - interval '1 second' * (1 + r.h1 % (60 * 86400))
           -- NULL-session and linked fingerprints: any time in the last 90 days.
           ELSE CAST(:anchor AS timestamptz) - interval '1 second' * (r.h1 % (90 * 86400))
       END
FROM generate_series(0, CAST(:fingerprints AS bigint) - 1) AS f
CROSS JOIN LATERAL (SELECT {f1} AS h1, {f2} AS h2, {f3} AS h3, {f4} AS h4) AS r
-- The user the fingerprint belongs to; linked ones point at one of that user's sessions.
CROSS JOIN LATERAL (SELECT 1 + r.h2 / 5 % :users AS owner) AS o
"""


def inserts(quoted_schema: str) -> list[str]:
    """The four statements, users first, for the already quoted schema name.

    Their bind parameters: ``users``, ``fingerprints``, ``seed``, ``anchor``,
    ``retention_cutoff``, ``grace_cutoff``, ``tiny`` and ``every``.
    """
    return [
        template.format(schema=quoted_schema, **_FRAGMENTS)
        for template in (USERS_SQL, SESSIONS_SQL, DECLINES_SQL, FINGERPRINTS_SQL)
    ]
