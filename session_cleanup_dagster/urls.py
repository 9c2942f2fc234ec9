"""Normalising the app database URL to the psycopg 3 driver."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError

__all__ = ["ACCEPTED_SCHEMES", "psycopg_url"]

ACCEPTED_SCHEMES: tuple[str, ...] = ("postgresql", "postgres", "postgresql+psycopg")
"""URL schemes accepted for ``APP_DATABASE_URL``; all of them are driven by psycopg 3."""

_DRIVERNAME = "postgresql+psycopg"


def psycopg_url(url: str | sa.URL) -> sa.URL:
    """Parse a PostgreSQL URL and make SQLAlchemy drive it with psycopg 3.

    ``postgresql://`` would otherwise select psycopg2 and ``postgres://`` (Heroku style) is not
    known to SQLAlchemy at all, so both are rewritten to ``postgresql+psycopg``. Everything
    else in the URL (credentials, host, query such as ``?host=/socket/dir``) is kept.

    Args:
        url: The URL as a string or an already parsed :class:`sqlalchemy.URL`.

    Returns:
        The URL with its driver set to ``postgresql+psycopg``.

    Raises:
        ValueError: If the URL cannot be parsed or its scheme is not one of
            :data:`ACCEPTED_SCHEMES`. The message never contains the password.
    """
    try:
        parsed = sa.make_url(url)
    except (ArgumentError, ValueError):
        # SQLAlchemy's own message may repeat the raw string, password included, so drop it;
        # ValueError is what a non-numeric port raises.
        raise ValueError(
            "could not parse the database URL; expected one of "
            + ", ".join(f"{scheme}://..." for scheme in ACCEPTED_SCHEMES)
        ) from None
    if parsed.drivername not in ACCEPTED_SCHEMES:
        # Shown without its query: libpq also takes the password as ?password=...
        shown = parsed.set(query={}).render_as_string(hide_password=True)
        raise ValueError(
            f"unsupported database URL {shown!r}: "
            "the scheme must be one of " + ", ".join(f"{scheme}://" for scheme in ACCEPTED_SCHEMES)
        )
    return parsed.set(drivername=_DRIVERNAME)
