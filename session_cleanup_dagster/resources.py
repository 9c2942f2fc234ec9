"""The ``app_db`` resource: how the job reaches the app's PostgreSQL database.

Nothing here connects at import or definition time, so the code location loads (and the UI
works) while the app database is down. The engine is created when a run starts and disposed
when it ends: one engine, and so one small connection pool, per run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dagster as dg
import sqlalchemy as sa
from pydantic import Field, PrivateAttr

from session_cleanup_dagster.errors import ConfigError
from session_cleanup_dagster.health import ReplicaHold
from session_cleanup_dagster.locking import RunLock
from session_cleanup_dagster.schema import validate_identifier
from session_cleanup_dagster.urls import psycopg_url

URL_ENV_VAR = "APP_DATABASE_URL"
MISSING_URL = (
    f"{URL_ENV_VAR} is not set: export it as the app database's URL "
    f"({URL_ENV_VAR}=postgresql://user@host:5432/app, the password in the URL or in "
    "~/.pgpass) where the code location and its runs start, then restart them (or reload "
    "the code location in `dagster dev`)."
)


def session_settings(
    *,
    lock_timeout_ms: int,
    statement_timeout_ms: int,
    idle_in_transaction_timeout_ms: int,
) -> dict[str, str]:
    """Our per-session limits, set on every new connection right after it opens.

    Not as a libpq startup ``options`` string: PgBouncer refuses that startup parameter
    ("unsupported startup parameter: options"), and poolers told to ignore it drop the limits
    silently. ``SET`` after connecting works directly and through a session-pooling pooler.
    """
    return {
        "lock_timeout": str(int(lock_timeout_ms)),
        "statement_timeout": str(int(statement_timeout_ms)),
        "idle_in_transaction_session_timeout": str(int(idle_in_transaction_timeout_ms)),
        # If this client dies mid-statement, the server notices within 2 s and rolls back
        # instead of finishing a batch nobody will commit (PostgreSQL 14+).
        "client_connection_check_interval": "2000",
        # A batch statement runs for milliseconds, but the planner costs some of them (a
        # merge over the whole primary key, a window of many pages) above jit_above_cost:
        # compiling them took 5-50 ms a batch, more than running them (benchmarks/README.md).
        "jit": "off",
    }


def apply_settings(dbapi_connection: Any, settings: dict[str, str]) -> None:
    """Set ``settings`` for the session of a fresh psycopg connection, in one round trip."""
    calls = ", ".join("set_config(%s, %s, false)" for _ in settings)
    params = [item for pair in settings.items() for item in pair]
    with dbapi_connection.cursor() as cursor:
        cursor.execute(f"SELECT {calls}", params)
    dbapi_connection.commit()


def make_engine(
    url: str,
    *,
    application_name: str = "session-cleanup-dagster",
    lock_timeout_ms: int = 2000,
    statement_timeout_ms: int = 60_000,
    idle_in_transaction_timeout_ms: int = 60_000,
    connect_timeout_s: int = 10,
) -> sa.Engine:
    """A SQLAlchemy engine on psycopg 3 with our session limits; it does not connect yet.

    Raises:
        ConfigError: the URL is not a PostgreSQL URL (the message hides any password).
    """
    try:
        parsed = psycopg_url(url)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    connect_args: dict[str, Any] = {
        "application_name": application_name,
        "connect_timeout": connect_timeout_s,
        # No server-side prepared statements: behind a pooler they outlive the transaction on
        # one server connection and collide on another ("_pg3_0 already exists").
        "prepare_threshold": None,
    }
    engine = sa.create_engine(
        parsed,
        connect_args=connect_args,
        # One connection does all the work; a second covers a pre-ping replacement.
        pool_size=1,
        max_overflow=1,
        # After a server restart the pooled connection is dead: find out before a batch.
        pool_pre_ping=True,
        # Bound parameters (ids, cutoffs) stay out of error messages and logs.
        hide_parameters=True,
    )
    settings = session_settings(
        lock_timeout_ms=lock_timeout_ms,
        statement_timeout_ms=statement_timeout_ms,
        idle_in_transaction_timeout_ms=idle_in_transaction_timeout_ms,
    )

    @sa.event.listens_for(engine, "connect")
    def _limit_session(dbapi_connection: Any, connection_record: Any) -> None:
        apply_settings(dbapi_connection, settings)

    return engine


class AppDatabase(dg.ConfigurableResource):  # type: ignore[misc,type-arg]
    """The app's PostgreSQL database, reached with psycopg 3 through SQLAlchemy."""

    url: str | None = Field(
        default=None,
        description=(
            "Database URL: postgresql://, postgres:// or postgresql+psycopg://, always driven "
            "by psycopg 3. Unset: the APP_DATABASE_URL environment variable. Give another "
            "variable as {env: NAME}, never the URL itself."
        ),
    )
    db_schema: str = Field(
        default="public",
        description="Schema that holds the app's tables (a plain lower-case identifier).",
    )
    application_name: str = Field(
        default="session-cleanup-dagster",
        description="Shown in pg_stat_activity, so a DBA can see who is working.",
    )
    lock_timeout_ms: int = Field(
        default=2000,
        description="Longest wait for a lock; rows the app holds are skipped, not waited on.",
    )
    statement_timeout_ms: int = Field(
        default=60_000, description="Longest single statement; a batch takes far less."
    )
    idle_in_transaction_timeout_ms: int = Field(
        default=60_000,
        description="The server ends a transaction this client left open this long.",
    )
    connect_timeout_s: int = Field(default=10, description="Longest wait for a connection.")
    lock_wait_s: int = Field(
        default=300,
        description=(
            "Longest wait for the cleanup lock while another cleanup holds it; then the run "
            "fails, having changed nothing (docs/operations.md, the overlap guard)."
        ),
    )

    max_replica_lag_mb: int = Field(
        default=100,
        description=(
            "Hold batches while a streaming replica replays more than this many MB behind "
            "the primary (pg_stat_replication); 0 turns the hold off."
        ),
    )
    replica_hold_max_s: int = Field(
        default=1800,
        description=(
            "Longest a step holds for replica lag; then it fails, keeping every committed "
            "batch, and the next run goes on."
        ),
    )

    _engine: sa.Engine | None = PrivateAttr(default=None)
    _run_lock: RunLock | None = PrivateAttr(default=None)

    def database_url(self) -> str:
        """The URL: ``url`` if set, else $APP_DATABASE_URL, read when a run needs it.

        Read here rather than through ``EnvVar`` in the definitions, so that a code location
        started without it (``dagster dev`` in a fresh clone) loads, its sensors skip, and a
        run fails with this one line instead of a configuration traceback at launch.

        Raises:
            ConfigError: neither is set.
        """
        url = self.url if self.url is not None else dg.EnvVar(URL_ENV_VAR).get_value()
        if url is None:
            raise ConfigError(MISSING_URL)
        return url

    def validate_settings(self) -> None:
        """Check the settings that can be checked without a connection.

        Raises:
            ConfigError: with what is wrong and what is valid.
        """
        try:
            validate_identifier(self.db_schema, "app_db.db_schema")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for name in ("lock_timeout_ms", "statement_timeout_ms", "idle_in_transaction_timeout_ms"):
            value = getattr(self, name)
            if not 1 <= value <= 3_600_000:
                raise ConfigError(f"app_db.{name} is {value}: use 1 to 3600000 (milliseconds).")
        if not 0 <= self.lock_wait_s <= 86_400:
            raise ConfigError(
                f"app_db.lock_wait_s is {self.lock_wait_s}: use 0 to 86400 (seconds)."
            )
        if not 0 <= self.max_replica_lag_mb <= 1_000_000:
            raise ConfigError(
                f"app_db.max_replica_lag_mb is {self.max_replica_lag_mb}: use 0 (off) to "
                "1000000 (MB)."
            )
        if not 1 <= self.replica_hold_max_s <= 86_400:
            raise ConfigError(
                f"app_db.replica_hold_max_s is {self.replica_hold_max_s}: use 1 to 86400 (seconds)."
            )
        if not 1 <= self.connect_timeout_s <= 300:
            raise ConfigError(
                f"app_db.connect_timeout_s is {self.connect_timeout_s}: use 1 to 300 (seconds)."
            )

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Create the run's engine (no connection is made here), so bad settings fail first.

        Without a URL at all, nothing fails yet: each op (or sensor) that needs the database
        reports the missing variable itself, and the sensors that do not, tick on.
        """
        if self.url is not None or dg.EnvVar(URL_ENV_VAR).get_value() is not None:
            self.get_engine()
        else:
            self.validate_settings()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        """Close every connection of the run's engine, and the lock connection."""
        if self._run_lock is not None:
            self._run_lock.close()
            self._run_lock = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def get_engine(self) -> sa.Engine:
        """The run's engine; created on first use outside a Dagster run."""
        if self._engine is None:
            self.validate_settings()
            self._engine = make_engine(
                self.database_url(),
                application_name=self.application_name,
                lock_timeout_ms=self.lock_timeout_ms,
                statement_timeout_ms=self.statement_timeout_ms,
                idle_in_transaction_timeout_ms=self.idle_in_transaction_timeout_ms,
                connect_timeout_s=self.connect_timeout_s,
            )
        return self._engine

    def reconnect(self) -> None:
        """Drop every connection (the lock's too): the next use connects afresh."""
        if self._run_lock is not None:
            self._run_lock.close()
        if self._engine is not None:
            self._engine.dispose()

    def replica_hold(self, step: str, log: Any, *, check_cancel: Callable[[], None]) -> ReplicaHold:
        """The replica-lag hold for one step (health.py); it connects on first use."""
        return ReplicaHold(
            self.database_url(),
            step,
            max_lag_mb=self.max_replica_lag_mb,
            max_hold_s=self.replica_hold_max_s,
            connect_timeout_s=self.connect_timeout_s,
            log=log,
            check_cancel=check_cancel,
        )

    def run_lock(self, run_id: str) -> RunLock:
        """This run's cleanup lock (not yet taken); one per run, shared by its ops."""
        if self._run_lock is None:
            self._run_lock = RunLock(
                self.database_url(), run_id, connect_timeout_s=self.connect_timeout_s
            )
        return self._run_lock

    def password(self) -> str | None:
        """The password in the URL (or its ``?password=``), so messages can be scrubbed of it."""
        try:
            parsed = psycopg_url(self.database_url())
        except (ValueError, ConfigError):
            return None
        query = parsed.query.get("password")
        return parsed.password or (query if isinstance(query, str) else None)

    def describe(self) -> str:
        """``host:port/database`` for messages; never the user or password."""
        try:
            parsed = psycopg_url(self.database_url())
        except ConfigError:
            return f"{URL_ENV_VAR} (not set)"
        except ValueError:
            return f"{URL_ENV_VAR} (malformed)"
        host = parsed.host or parsed.query.get("host") or "local socket"
        return f"{host}:{parsed.port or 5432}/{parsed.database or ''}"
