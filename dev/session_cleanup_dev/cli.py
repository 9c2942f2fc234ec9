"""The ``session-cleanup`` command: seed a database, or run the whole job on a local demo."""

from __future__ import annotations

import os
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import click
import sqlalchemy as sa

from session_cleanup_dagster.resources import make_engine
from session_cleanup_dev.seed import parse_scale, seed_database

DEMO_USERS = 2000


@click.group()
def main() -> None:
    """Nightly cleanup of the After Hours app database, as a Dagster code location."""


@main.command()
@click.option(
    "--database-url",
    required=True,
    # Never $APP_DATABASE_URL: in a production pod that is the production database.
    help="Target database, always given explicitly: a new, empty one. The reference tables "
    "are created if missing; a database holding any rows, in any table, is refused.",
)
@click.option(
    "--scale",
    default="XS",
    show_default=True,
    help="Number of users, or XS (10k), S (200k), L (1M). Rows: 5 sessions, 5 declines and "
    "1.5 fingerprints per user.",
)
@click.option("--seed", "seed_value", default=0, show_default=True, help="Randomness seed.")
@click.option(
    "--anchor",
    default=None,
    help="Instant the data is relative to (ISO 8601); default: now.",
)
def seed(database_url: str, scale: str, seed_value: int, anchor: str | None) -> None:
    """Create the reference schema and deterministic synthetic data at a chosen size."""
    try:
        users = parse_scale(scale)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--scale") from None
    anchor_dt = datetime.fromisoformat(anchor).astimezone(UTC) if anchor else None
    engine = _engine(database_url)
    try:
        counts = seed_database(engine, users, anchor=anchor_dt, seed=seed_value)
    finally:
        engine.dispose()
    for table, count in counts.items():
        click.echo(f"{table:<22} {count:>10}")


@main.command()
@click.option("--users", default=DEMO_USERS, show_default=True, help="Demo size, in users.")
def demo(users: int) -> None:
    """Start an embedded PostgreSQL, seed it, run the job through Dagster, show the counts.

    Needs no PostgreSQL server: the pgserver wheel brings one, and everything it starts is
    stopped and removed at the end.
    """
    from session_cleanup_dev.demo import run_demo

    with tempfile.TemporaryDirectory(prefix="session-cleanup-demo-") as home:
        ok = run_demo(Path(home), users=users, echo=click.echo)
    sys.exit(0 if ok else 1)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Webserver address.")
@click.option("--port", default=3000, show_default=True, help="Webserver port (0: any free).")
@click.option(
    "--project-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Directory with dagster.yaml and workspace.yaml (default: this checkout).",
)
@click.option(
    "--users", default=DEMO_USERS, show_default=True, help="Demo data size (embedded only)."
)
@click.option(
    "--cancel-timeout",
    default=30.0,
    show_default=True,
    help="On shutdown, how long to wait for terminated runs to reach CANCELED (seconds).",
)
def dev(host: str, port: int, project_dir: Path | None, users: int, cancel_timeout: float) -> None:
    """Run the webserver, daemon and code location until Ctrl-C or SIGTERM.

    Uses the repo's dagster.yaml and workspace.yaml. Without APP_DATABASE_URL or
    DAGSTER_PG_URL it starts an embedded PostgreSQL for both and seeds demo data. On
    shutdown it terminates every in-flight run and waits for CANCELED, then stops everything.
    """
    from session_cleanup_dev.devstack import DevOptions, run_dev

    options = DevOptions(
        host=host,
        port=port,
        project_dir=project_dir,
        users=users,
        cancel_timeout_s=cancel_timeout,
    )
    sys.exit(run_dev(options, echo=lambda line: click.echo(line, err=True)))


def _engine(url: str) -> sa.Engine:
    try:
        return make_engine(url)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--database-url") from None


if __name__ == "__main__":  # pragma: no cover
    main(prog_name=os.path.basename(sys.argv[0]))
