"""The reference schema, the synthetic data seeder and URL normalisation.

Runs against the suite's server (tests/pg.py). Each test gets its own uniquely named database,
dropped with ``WITH (FORCE)`` afterwards; the server's own databases are never touched.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from session_cleanup_dev.seed import (
    SCALES,
    parse_scale,
    seed_database,
    table_counts,
)
from sqlalchemy.pool import NullPool

from session_cleanup_dagster.schema import TABLES, create_reference_schema
from session_cleanup_dagster.urls import psycopg_url
from tests import pg

# The day after the EU switch to summer time: "anchor - 7 days" crosses a DST change in
# Europe/Berlin, which must not matter.
ANCHOR = datetime(2025, 3, 31, 4, 0, tzinfo=UTC)
RETENTION_CUTOFF = ANCHOR - timedelta(days=7)
GRACE_CUTOFF = ANCHOR - timedelta(hours=1)
TINY = timedelta(microseconds=1)
N = 1000


@contextmanager
def scratch_engine(admin_url: str, **engine_kwargs: Any) -> Iterator[sa.Engine]:
    """A uniquely named database on the suite's server and an engine on it; dropped on exit."""
    with pg.scratch_database(admin_url) as url:
        engine = sa.create_engine(psycopg_url(url), poolclass=NullPool, **engine_kwargs)
        try:
            yield engine
        finally:
            engine.dispose()


@pytest.fixture
def engine(admin_url: str) -> Iterator[sa.Engine]:
    with scratch_engine(admin_url) as eng:
        yield eng


@pytest.fixture
def seeded(engine: sa.Engine) -> sa.Engine:
    """A scratch database seeded with N users at ANCHOR."""
    seed_database(engine, N, anchor=ANCHOR, seed=3)
    return engine


def scalar(engine: sa.Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.text(sql), params).scalar_one()


def dump(engine: sa.Engine, schema: str = "public") -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the four tables, every column, ordered by id."""
    with engine.connect() as conn:
        return {
            table: [
                tuple(row)
                for row in conn.execute(sa.text(f"SELECT * FROM {schema}.{table} ORDER BY id"))
            ]
            for table in TABLES
        }


def catalog(engine: sa.Engine, schema: str = "public") -> dict[str, list[tuple[Any, ...]]]:
    """Columns, constraints and indexes of the schema, in comparable form."""
    with engine.connect() as conn:
        columns = conn.execute(
            sa.text(
                "SELECT table_name, ordinal_position, column_name, data_type,"
                " character_maximum_length, numeric_precision, numeric_scale, is_nullable,"
                " column_default FROM information_schema.columns WHERE table_schema = :s"
                " ORDER BY 1, 2"
            ),
            {"s": schema},
        ).all()
        constraints = conn.execute(
            sa.text(
                "SELECT t.relname, c.conname, c.contype, pg_get_constraintdef(c.oid)"
                " FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid"
                " JOIN pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname = :s"
                " ORDER BY 1, 2"
            ),
            {"s": schema},
        ).all()
        indexes = conn.execute(
            sa.text(
                "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = :s"
                " ORDER BY 1, 2"
            ),
            {"s": schema},
        ).all()
    return {
        "columns": [tuple(r) for r in columns],
        "constraints": [tuple(r) for r in constraints],
        "indexes": [tuple(r) for r in indexes],
    }


# --- the reference schema ------------------------------------------------------------------


def test_reference_schema_matches_design(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        create_reference_schema(conn)
        create_reference_schema(conn)  # idempotent
    cat = catalog(engine)
    indexes = {name: definition for _, name, definition in cat["indexes"]}
    assert set(indexes) == {
        "users_pkey",
        "after_hours_sessions_pkey",
        "after_hours_sessions_one_open_per_user",
        "after_hours_sessions_open_expires_idx",
        "after_hours_declines_pkey",
        "after_hours_declines_user_id_declined_user_id_key",
        "after_hours_declines_session_id_idx",
        "after_hours_declines_user_id_idx",
        "device_fingerprints_pkey",
        "device_fingerprints_session_id_idx",
    }
    assert indexes["after_hours_sessions_one_open_per_user"].startswith("CREATE UNIQUE INDEX")
    assert indexes["after_hours_sessions_one_open_per_user"].endswith(
        "(user_id) WHERE (ended_at IS NULL)"
    )
    assert indexes["after_hours_sessions_open_expires_idx"].endswith(
        "(expires_at) WHERE (ended_at IS NULL)"
    )
    # The app's schema has no index on declines.created_at; purge_declines must cope.
    assert not [d for d in indexes.values() if "created_at" in d]

    fks = {(t, name): d for t, name, kind, d in cat["constraints"] if kind == "f"}
    assert fks == {
        ("after_hours_sessions", "after_hours_sessions_user_id_fkey"): (
            "FOREIGN KEY (user_id) REFERENCES users(id) ON DELETE CASCADE"
        ),
        ("after_hours_declines", "after_hours_declines_session_id_fkey"): (
            "FOREIGN KEY (session_id) REFERENCES after_hours_sessions(id) ON DELETE CASCADE"
        ),
        ("after_hours_declines", "after_hours_declines_user_id_fkey"): (
            "FOREIGN KEY (user_id) REFERENCES users(id) ON DELETE CASCADE"
        ),
        ("after_hours_declines", "after_hours_declines_declined_user_id_fkey"): (
            "FOREIGN KEY (declined_user_id) REFERENCES users(id) ON DELETE CASCADE"
        ),
    }
    columns = {(r[0], r[2]): r for r in cat["columns"]}
    assert columns[("after_hours_sessions", "id")][8] == "gen_random_uuid()"
    assert columns[("after_hours_sessions", "ended_at")][7] == "YES"
    assert columns[("after_hours_sessions", "latitude")][5:7] == (10, 8)
    assert columns[("after_hours_sessions", "longitude")][5:7] == (11, 8)
    assert columns[("device_fingerprints", "session_id")][7] == "YES"
    assert columns[("users", "id")][4] == 255
    assert columns[("after_hours_declines", "decline_count")][8] == "1"


@pytest.mark.parametrize("bad", ["Public", "bad-name", "x; drop table users", "a" * 64, "1abc", ""])
def test_invalid_schema_names_are_rejected(engine: sa.Engine, bad: str) -> None:
    with pytest.raises(ValueError, match="not a plain identifier"), engine.begin() as conn:
        create_reference_schema(conn, bad)
    with pytest.raises(ValueError, match="not a plain identifier"):
        seed_database(engine, 10, anchor=ANCHOR, schema=bad)


def test_reserved_word_schema_is_quoted(engine: sa.Engine) -> None:
    counts = seed_database(engine, 10, anchor=ANCHOR, schema="user")
    assert counts["users"] == 10
    assert table_counts(engine, "user") == counts


# --- seeding: counts, proportions, constraints ------------------------------------------------


def test_counts_and_proportions(seeded: sa.Engine) -> None:
    assert table_counts(seeded) == {
        "users": N,
        "after_hours_sessions": 5 * N,
        "after_hours_declines": 5 * N,
        "device_fingerprints": 3 * N // 2,
    }
    sessions = "SELECT count(*) FROM after_hours_sessions WHERE "
    assert scalar(seeded, sessions + "ended_at IS NULL") == N
    assert scalar(seeded, sessions + "ended_at IS NULL AND expires_at < :a", a=ANCHOR) == 3 * N // 4
    assert scalar(seeded, sessions + "ended_at IS NULL AND expires_at >= :a", a=ANCHOR) == N // 4
    assert scalar(seeded, sessions + "ended_at IS NOT NULL") == 4 * N

    declines = "SELECT count(*) FROM after_hours_declines WHERE "
    assert scalar(seeded, declines + "created_at < :c", c=RETENTION_CUTOFF) == 3 * N
    assert scalar(seeded, declines + "created_at >= :c", c=RETENTION_CUTOFF) == 2 * N
    assert scalar(seeded, declines + "created_at > :a", a=ANCHOR) == 0

    fingerprints = "SELECT count(*) FROM device_fingerprints f WHERE "
    orphan = (
        "session_id IS NOT NULL"
        " AND NOT EXISTS (SELECT 1 FROM after_hours_sessions s WHERE s.id = f.session_id)"
    )
    total = 3 * N // 2
    assert scalar(seeded, fingerprints + orphan) == total // 5
    assert scalar(seeded, fingerprints + "session_id IS NULL") == total // 20
    assert scalar(seeded, fingerprints + f"session_id IS NOT NULL AND NOT ({orphan})") == (
        total * 3 // 4
    )
    # 1 orphan in 20 is inside the grace period; 4 more sit exactly on its boundary.
    young = scalar(seeded, fingerprints + orphan + " AND created_at > :g", g=GRACE_CUTOFF)
    assert young == total // 5 // 20
    null_users = scalar(seeded, fingerprints + "user_id IS NULL")
    assert 0.05 * total < null_users < 0.15 * total


def test_rows_are_consistent(seeded: sa.Engine) -> None:
    checks = {
        "users with other than one open session": """
            SELECT count(*) FROM users u WHERE (SELECT count(*) FROM after_hours_sessions s
                WHERE s.user_id = u.id AND s.ended_at IS NULL) <> 1""",
        "closed sessions out of order": """
            SELECT count(*) FROM after_hours_sessions WHERE ended_at IS NOT NULL
                AND NOT (started_at <= ended_at AND ended_at <= expires_at AND expires_at < :a)""",
        "sessions starting after the anchor or expiring before they start": """
            SELECT count(*) FROM after_hours_sessions
                WHERE started_at > :a OR expires_at <= started_at OR created_at <> started_at""",
        "sessions of users created later": """
            SELECT count(*) FROM after_hours_sessions s JOIN users u ON u.id = s.user_id
                WHERE u.created_at >= s.started_at""",
        "coordinates out of range": """
            SELECT count(*) FROM after_hours_sessions WHERE abs(latitude) > 90
                OR abs(longitude) > 180 OR abs(fuzzed_latitude - latitude) > 0.01
                OR abs(fuzzed_longitude - longitude) > 0.01""",
        "self declines": """
            SELECT count(*) FROM after_hours_declines WHERE user_id = declined_user_id""",
        "users declining other than 5 distinct users": """
            SELECT count(*) FROM (SELECT user_id FROM after_hours_declines GROUP BY user_id
                HAVING count(DISTINCT declined_user_id) <> 5) x""",
        "declines on another user's session": """
            SELECT count(*) FROM after_hours_declines d
                JOIN after_hours_sessions s ON s.id = d.session_id WHERE s.user_id <> d.user_id""",
        "declines with odd counters": """
            SELECT count(*) FROM after_hours_declines WHERE decline_count NOT BETWEEN 1 AND 3
                OR first_declined_at > created_at OR last_session_id <> session_id
                OR (decline_count = 1) <> (first_declined_at = created_at)""",
        "linked fingerprints of another user": """
            SELECT count(*) FROM device_fingerprints f JOIN after_hours_sessions s
                ON s.id = f.session_id WHERE f.user_id <> s.user_id""",
        "fingerprints in the future or unknown users": """
            SELECT count(*) FROM device_fingerprints f WHERE f.created_at > :a
                OR (f.user_id IS NOT NULL
                    AND NOT EXISTS (SELECT 1 FROM users u WHERE u.id = f.user_id))""",
        "bad fingerprint hashes": """
            SELECT count(*) FROM device_fingerprints
                WHERE fingerprint_hash !~ '^[0-9a-f]{64}$'""",
    }
    failures = {name: n for name, sql in checks.items() if (n := scalar(seeded, sql, a=ANCHOR))}
    assert failures == {}
    assert scalar(seeded, "SELECT count(DISTINCT fingerprint_hash) FROM device_fingerprints") == (
        3 * N // 2
    )


def test_boundary_rows_exist_and_survive_a_cleanup_at_the_anchor(seeded: sa.Engine) -> None:
    # Users 4, 404, 804 carry the boundary rows; users 1, 401, 801 their just-past twins.
    boundary = {
        "open sessions expiring exactly at T": (
            "SELECT count(*) FROM after_hours_sessions WHERE ended_at IS NULL AND expires_at = :t"
        ),
        "declines exactly at T - 7 days": (
            "SELECT count(*) FROM after_hours_declines WHERE created_at = :t - interval '168 hours'"
        ),
        "orphans exactly at T - 1 hour": (
            "SELECT count(*) FROM device_fingerprints f WHERE created_at = :t - interval '1 hour'"
            " AND NOT EXISTS (SELECT 1 FROM after_hours_sessions s WHERE s.id = f.session_id)"
            " AND session_id IS NOT NULL"
        ),
    }
    just_past = {
        "sessions": "SELECT count(*) FROM after_hours_sessions WHERE expires_at = :t - :tiny",
        "declines": (
            "SELECT count(*) FROM after_hours_declines"
            " WHERE created_at = :t - interval '168 hours' - :tiny"
        ),
        "fingerprints": (
            "SELECT count(*) FROM device_fingerprints"
            " WHERE created_at = :t - interval '1 hour' - :tiny"
        ),
    }
    # The cleanup contract of DESIGN.md, written as plainly as possible.
    contract = [
        (
            (
                "UPDATE after_hours_sessions SET ended_at = expires_at"
                " WHERE ended_at IS NULL AND expires_at < :t"
            ),
            3 * N // 4,
        ),
        ("DELETE FROM after_hours_declines WHERE created_at < :t - interval '168 hours'", 3 * N),
        (
            (
                "DELETE FROM device_fingerprints f WHERE session_id IS NOT NULL"
                " AND NOT EXISTS (SELECT 1 FROM after_hours_sessions s WHERE s.id = f.session_id)"
                " AND created_at < :t - interval '1 hour'"
            ),
            # All orphans but the young ones and the 4 exactly on the grace boundary.
            (3 * N // 2) // 5 - (3 * N // 2) // 5 // 20 - 4,
        ),
    ]
    params = {"t": ANCHOR, "tiny": TINY}
    with seeded.connect() as conn:
        before = {k: conn.execute(sa.text(q), params).scalar_one() for k, q in boundary.items()}
        assert before == {k: 3 if "orphans" not in k else 4 for k in boundary}
        past = {k: conn.execute(sa.text(q), params).scalar_one() for k, q in just_past.items()}
        assert past == {"sessions": 3, "declines": 3, "fingerprints": 4}

        conn.rollback()
        # Apply the contract in a transaction that is rolled back: only the counts matter.
        transaction = conn.begin()
        try:
            changed = [conn.execute(sa.text(sql), params).rowcount for sql, _ in contract]
            after = {k: conn.execute(sa.text(q), params).scalar_one() for k, q in boundary.items()}
            gone = {k: conn.execute(sa.text(q), params).scalar_one() for k, q in just_past.items()}
        finally:
            transaction.rollback()
    assert changed == [expected for _, expected in contract]
    assert after == before
    # Just-past sessions are expired (still there, now closed); the others are deleted.
    assert gone == {"sessions": 3, "declines": 0, "fingerprints": 0}


# --- determinism -----------------------------------------------------------------------------


def test_same_arguments_give_identical_rows(admin_url: str) -> None:
    with scratch_engine(admin_url) as first, scratch_engine(admin_url) as second:
        seed_database(first, 300, anchor=ANCHOR, seed=11)
        seed_database(second, 300, anchor=ANCHOR, seed=11)
        assert dump(first) == dump(second)


def test_seed_and_anchor_change_the_rows(admin_url: str) -> None:
    with scratch_engine(admin_url) as first, scratch_engine(admin_url) as second:
        seed_database(first, 50, anchor=ANCHOR, seed=1)
        seed_database(second, 50, anchor=ANCHOR + timedelta(days=1), seed=2)
        a, b = dump(first), dump(second)
        assert {r[0] for r in a["after_hours_sessions"]}.isdisjoint(
            r[0] for r in b["after_hours_sessions"]
        )
        assert a["users"] != b["users"]


def test_session_time_zone_does_not_matter(admin_url: str) -> None:
    berlin = {"connect_args": {"options": "-c TimeZone=Europe/Berlin"}}
    with scratch_engine(admin_url) as utc, scratch_engine(admin_url, **berlin) as local:
        seed_database(utc, 200, anchor=ANCHOR, seed=5)
        # The same instant, expressed in another zone, is the same anchor.
        seed_database(local, 200, anchor=ANCHOR.astimezone(timezone(timedelta(hours=2))), seed=5)
        assert dump(utc) == dump(local)


def test_existing_schema_path_matches_bulk_load_path(admin_url: str) -> None:
    """Seeding pre-created tables (keys in place) gives the same catalog and rows."""
    with scratch_engine(admin_url) as bulk, scratch_engine(admin_url) as existing:
        seed_database(bulk, 200, anchor=ANCHOR, seed=9)
        with existing.begin() as conn:
            create_reference_schema(conn)
        seed_database(existing, 200, anchor=ANCHOR, seed=9, create_schema=False)
        assert catalog(bulk) == catalog(existing)
        assert dump(bulk) == dump(existing)


def test_other_schema(engine: sa.Engine) -> None:
    counts = seed_database(engine, 40, anchor=ANCHOR, schema="bench_s1")
    assert counts == {
        "users": 40,
        "after_hours_sessions": 200,
        "after_hours_declines": 200,
        "device_fingerprints": 60,
    }
    with engine.connect() as conn:
        public_tables = conn.execute(
            sa.text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        ).scalar_one()
    assert public_tables == 0


def test_default_anchor_is_now_to_the_second(engine: sa.Engine) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    seed_database(engine, 10)
    after = datetime.now(UTC)
    # User 4's open session expires exactly at the anchor.
    expires = scalar(
        engine,
        "SELECT expires_at FROM after_hours_sessions WHERE user_id = 'user_4' AND ended_at IS NULL",
    )
    assert before <= expires <= after
    assert expires.microsecond == 0


# --- refusals ----------------------------------------------------------------------------------


def test_refuses_tables_with_rows(seeded: sa.Engine) -> None:
    before = dump(seeded)
    with pytest.raises(ValueError, match=r"already holds rows \(in public\.after_hours_declines"):
        seed_database(seeded, N, anchor=ANCHOR)
    assert dump(seeded) == before


def database_state(engine: sa.Engine) -> dict[str, Any]:
    """Every table outside the system schemas, and every row of the app's own table."""
    with engine.connect() as conn:
        tables = conn.execute(
            sa.text(
                "SELECT schemaname, tablename FROM pg_tables"
                " WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2"
            )
        ).all()
        messages = conn.execute(sa.text("SELECT * FROM app.messages ORDER BY id")).all()
    return {"tables": [tuple(t) for t in tables], "messages": [tuple(m) for m in messages]}


def test_refuses_a_database_holding_rows_it_did_not_create(engine: sa.Engine) -> None:
    """The app's database, say: one row in any table of any schema, and nothing is written."""
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA app"))
        conn.execute(sa.text("CREATE TABLE app.messages (id int PRIMARY KEY, body text)"))
        conn.execute(sa.text("INSERT INTO app.messages VALUES (1, 'hello')"))
    before = database_state(engine)
    with pytest.raises(ValueError, match=r"already holds rows \(in app\.messages\); .*\(createdb"):
        seed_database(engine, 10, anchor=ANCHOR)
    assert database_state(engine) == before
    assert before["tables"] == [("app", "messages")]

    # The same database with the row gone is empty again, and is seeded.
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM app.messages"))
    assert seed_database(engine, 10, anchor=ANCHOR)["users"] == 10


def test_refuses_a_database_with_a_table_it_cannot_read(admin_url: str) -> None:
    """A table the seeding role may not read could hold anything: refused, unread."""
    role = f"seed_reader_{uuid.uuid4().hex[:12]}"
    with scratch_engine(admin_url) as owner:
        with owner.begin() as conn:
            conn.execute(sa.text("CREATE TABLE secret (id int)"))
            conn.execute(sa.text(f"CREATE ROLE {role}"))
            conn.execute(sa.text(f"GRANT CREATE, USAGE ON SCHEMA public TO {role}"))
        try:
            seeder = sa.create_engine(
                owner.url, poolclass=NullPool, connect_args={"options": f"-c role={role}"}
            )
            try:
                with pytest.raises(ValueError, match=r"already holds rows \(in public\.secret\)"):
                    seed_database(seeder, 10, anchor=ANCHOR)
            finally:
                seeder.dispose()
            with owner.connect() as conn:
                names = conn.execute(
                    sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                )
                assert names.scalars().all() == ["secret"]
        finally:
            with owner.begin() as conn:
                conn.execute(sa.text(f"REVOKE ALL ON SCHEMA public FROM {role}"))
                conn.execute(sa.text(f"DROP ROLE {role}"))


def test_refuses_missing_tables_without_create_schema(engine: sa.Engine) -> None:
    with pytest.raises(ValueError, match="lacks tables"):
        seed_database(engine, 10, anchor=ANCHOR, create_schema=False)


@pytest.mark.parametrize("users", [0, 5, -1, True])
def test_refuses_too_few_users(engine: sa.Engine, users: int) -> None:
    with pytest.raises(ValueError, match="users must be"):
        seed_database(engine, users, anchor=ANCHOR)


def test_refuses_naive_anchor(engine: sa.Engine) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        seed_database(engine, 10, anchor=datetime(2025, 1, 1))


# --- parse_scale and psycopg_url (no database) -------------------------------------------------


@pytest.mark.parametrize(
    ("value", "users"),
    [("XS", 10_000), ("s", 200_000), (" L ", 1_000_000), ("1234", 1234), ("7", 7)],
)
def test_parse_scale(value: str, users: int) -> None:
    assert parse_scale(value) == users


@pytest.mark.parametrize("value", ["", "M", "0", "-5", "1.5", "ten"])
def test_parse_scale_rejects(value: str) -> None:
    with pytest.raises(ValueError, match="XS"):
        parse_scale(value)


def test_scales() -> None:
    assert SCALES == {"XS": 10_000, "S": 200_000, "L": 1_000_000}


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:pw@db.example:5433/app",
        "postgres://u:pw@db.example:5433/app",
        "postgresql+psycopg://u:pw@db.example:5433/app",
    ],
)
def test_psycopg_url_accepts(url: str) -> None:
    parsed = psycopg_url(url)
    assert parsed.drivername == "postgresql+psycopg"
    assert (parsed.username, parsed.password, parsed.host, parsed.port, parsed.database) == (
        "u",
        "pw",
        "db.example",
        5433,
        "app",
    )


def test_psycopg_url_keeps_socket_query() -> None:
    parsed = psycopg_url("postgresql://postgres@/app?host=/tmp/sock&port=5432")
    assert dict(parsed.query) == {"host": "/tmp/sock", "port": "5432"}


@pytest.mark.parametrize(
    "url",
    [
        "mysql://u:hunter2@h/db",
        "postgresql+psycopg2://u:hunter2@h/db",
        "sqlite:///app.db",
        "hunter2",
        "postgresql://u:hunter2@h:port/db",
    ],
)
def test_psycopg_url_rejects_without_leaking_password(url: str) -> None:
    with pytest.raises(ValueError, match="postgresql://") as info:
        psycopg_url(url)
    assert "hunter2" not in str(info.value)
