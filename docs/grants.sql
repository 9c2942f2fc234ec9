-- The database role session_cleanup_job runs as: only the privileges it needs, nothing more.
--
-- Run this as the owner of the app's tables (or a superuser) in the app's database, e.g.
--   psql "$OWNER_URL" -f docs/grants.sql
--   psql "$OWNER_URL" -c '\password session_cleanup'
-- then put that role and password in APP_DATABASE_URL. For another role name or schema,
-- replace "session_cleanup" or "public" throughout (the tests do exactly that).
--
-- What the job does with each privilege:
--   * after_hours_sessions: reads id, expires_at, ended_at; sets ended_at. UPDATE (ended_at)
--     also covers the row lock (SELECT ... FOR NO KEY UPDATE) each batch takes.
--   * after_hours_declines, device_fingerprints: read the columns of the condition (and, for
--     declines, the row address ctid, which the heap walk pages through); DELETE. PostgreSQL
--     requires UPDATE on at least one column for SELECT ... FOR UPDATE even when the next
--     statement is a DELETE, so UPDATE is granted on the id column only (never updated).
--   * TEMPORARY on the database: remove_orphan_fingerprints keeps the session ids it finds
--     orphaned in a temporary table (its own, on its own connection) until it has deleted
--     their fingerprints. PostgreSQL grants it to PUBLIC by default; this makes it explicit.
--   * no access at all to users, nor to the columns that hold personal data (coordinates,
--     fingerprint hashes, user ids): the job never reads them, so it cannot leak them.
-- No INSERT (but into its own temporary table), no TRUNCATE, no REFERENCES, no TRIGGER, no DDL,
-- no CREATE on the schema.

CREATE ROLE session_cleanup LOGIN NOINHERIT;

DO $grant$
BEGIN
    -- The database name differs per installation; CONNECT is usually granted to PUBLIC
    -- already, this makes it explicit where PUBLIC's CONNECT has been revoked.
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO session_cleanup', current_database());
    EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO session_cleanup', current_database());
END
$grant$;

GRANT USAGE ON SCHEMA public TO session_cleanup;

GRANT SELECT (id, expires_at, ended_at, ctid) ON public.after_hours_sessions TO session_cleanup;
GRANT UPDATE (ended_at) ON public.after_hours_sessions TO session_cleanup;

GRANT SELECT (id, created_at, ctid) ON public.after_hours_declines TO session_cleanup;
GRANT UPDATE (id) ON public.after_hours_declines TO session_cleanup;
GRANT DELETE ON public.after_hours_declines TO session_cleanup;

GRANT SELECT (id, session_id, created_at) ON public.device_fingerprints TO session_cleanup;
GRANT UPDATE (id) ON public.device_fingerprints TO session_cleanup;
GRANT DELETE ON public.device_fingerprints TO session_cleanup;

-- Optional, recommended where the database streams to replicas: the step holds its batches
-- while a replica replays more than app_db.max_replica_lag_mb behind (health.py). Seeing
-- other roles' replication positions in pg_stat_replication takes pg_read_all_stats (part of
-- pg_monitor), which a NOINHERIT role only uses when the grant says INHERIT. Without it the
-- step warns once and runs unheld. PostgreSQL 16+:
--   GRANT pg_monitor TO session_cleanup WITH INHERIT TRUE;
-- PostgreSQL 14 and 15: ALTER ROLE session_cleanup INHERIT; GRANT pg_monitor TO session_cleanup;
