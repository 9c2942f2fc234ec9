"""What went wrong with the app database, in words an operator can act on.

Every database error that reaches an op is sorted into *transient* (worth a retry: the server
restarted, a connection was cut, a lock or deadlock got in the way) or *permanent* (a retry
would fail the same way: wrong credentials, a missing table, a missing privilege). The sorting
uses the SQLSTATE where PostgreSQL sends one and libpq's message where it does not (libpq
reports connection failures without a SQLSTATE).

Messages never contain a password: they are built from our own words plus the server's
message, and :func:`redact` removes any password that a driver might have echoed.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable

import psycopg
import sqlalchemy.exc

# SQLSTATEs that a retry can cure. Class 08 (connection exception) is matched by prefix.
TRANSIENT_SQLSTATES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "55P03",  # lock_not_available (our lock_timeout fired)
        "57014",  # query_canceled (our statement_timeout fired, or an admin cancel)
        "57P01",  # admin_shutdown (server restarting, or pg_terminate_backend)
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now (server starting up)
        "53300",  # too_many_connections
        "53400",  # configuration_limit_exceeded
        # read_only_sql_transaction: the primary became a standby (failover); a fresh
        # connection reaches the new primary once the URL's host follows it.
        "25006",
    }
)

# libpq connection failures carry no SQLSTATE; these fragments mark the ones a retry can cure.
_TRANSIENT_CONNECT_FRAGMENTS = (
    "connection refused",
    "timeout expired",
    "server closed the connection unexpectedly",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "terminating connection",
    "connection reset",
    "no route to host",
    "consuming input failed",
    "sending query failed",
    "ssl syscall error",
)


class CleanupError(Exception):
    """Base class for the errors this package raises on purpose."""


class PermanentDatabaseError(CleanupError):
    """A retry cannot help: the message says what to fix."""


class TransientDatabaseError(CleanupError):
    """A retry may help (server restart, cut connection, lock or deadlock)."""


class ConfigError(CleanupError, ValueError):
    """Invalid configuration, detected before any work was done."""


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """Replace every occurrence of each non-empty secret, and any URL password, with ``***``."""
    for secret in secrets:
        if not secret:
            continue
        # Also as it is written inside a URL: percent-encoded (quote), or with spaces as
        # "+" (quote_plus, how a query string such as ?password= is often written).
        for form in {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}:
            text = text.replace(form, "***")
    # postgresql://user:password@host: hide whatever sits between the colon and the @.
    return re.sub(r"(postgres(?:ql)?(?:\+\w+)?://[^:/@\s]+:)[^@\s]+@", r"\1***@", text)


def _orig(exc: BaseException) -> BaseException:
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.orig is not None:
        return exc.orig
    return exc


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a psycopg error, unwrapping SQLAlchemy's wrapper."""
    orig = _orig(exc)
    if isinstance(orig, psycopg.Error):
        return orig.sqlstate
    return None


def server_message(exc: BaseException) -> str:
    """The database's own message, without SQLAlchemy's statement dump and parameters."""
    orig = _orig(exc)
    if isinstance(orig, psycopg.Error) and orig.diag.message_primary:
        return orig.diag.message_primary
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the failed work may succeed."""
    if isinstance(exc, TransientDatabaseError):
        return True
    if isinstance(exc, CleanupError):
        return False
    orig = _orig(exc)
    if not isinstance(orig, psycopg.Error):
        return False
    state = orig.sqlstate
    if state is not None:
        return state in TRANSIENT_SQLSTATES or state.startswith("08")
    if isinstance(orig, psycopg.OperationalError | psycopg.InterfaceError):
        text = str(orig).lower()
        return any(fragment in text for fragment in _TRANSIENT_CONNECT_FRAGMENTS)
    return False


def explain(exc: BaseException, *, where: str, secrets: Iterable[str | None] = ()) -> str:
    """One operator-facing sentence (or two) for a database error, with a fix where we know it.

    Args:
        exc: the error, raw psycopg or wrapped by SQLAlchemy.
        where: what we were doing, e.g. ``"purge_declines on db.example.com/app"``.
        secrets: strings that must never appear in the result (passwords).
    """
    state = sqlstate(exc)
    message = server_message(exc)
    lowered = str(_orig(exc)).lower()
    hint = ""
    if state == "42P01":
        hint = (
            " A table this job cleans is missing: point APP_DATABASE_URL at the app's database"
            " (and app_db.db_schema at its schema)."
        )
    elif state == "42703":
        hint = " A column this job needs is missing: the app's schema differs from the reference."
    elif state == "42501":
        hint = " The database role lacks a privilege: apply docs/grants.sql as the table owner."
    elif "password authentication failed" in lowered or state in {"28P01", "28000"}:
        hint = " Check the user name and password in APP_DATABASE_URL."
    elif "does not exist" in lowered and "database" in lowered:
        hint = " Check the database name at the end of APP_DATABASE_URL."
    elif "role" in lowered and "does not exist" in lowered:
        hint = " Check the user name in APP_DATABASE_URL."
    elif "failed to resolve host" in lowered or "could not translate host name" in lowered:
        hint = " Check the host name in APP_DATABASE_URL."
    elif is_transient(exc):
        hint = " This is usually temporary (server restart, cut connection or lock); it is retried."
    code = f" [SQLSTATE {state}]" if state else ""
    return redact(f"{where}: {message}{code}.{hint}", secrets)
