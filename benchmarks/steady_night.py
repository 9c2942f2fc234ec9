"""A steady night: what one ordinary nightly run costs in pages, the job against the limit.

    .venv/bin/python -m benchmarks.steady_night --scale S [--admin-url URL] [--json PATH]

The reference data (``session-cleanup seed``'s, anchored at T1) is cleaned by the limit's
single statements at T0 = T1 - 1 day, then ``VACUUM (ANALYZE)`` and ``CHECKPOINT`` (as
autovacuum keeps a table between nights). Two identical copies are made from it
(``CREATE DATABASE ... TEMPLATE``). At T1, copy A runs the limit's three statements and
copy B the job's three steps, both in the job's order (the orphans first). For the job,
each step is what its op runs against the app database: the prerequisite check, the step
function, and the backlog count that ``assets.report_step`` makes after it. Then each copy
runs the same again with nothing left to do (the fixed cost of a run).

The cost is PAGES TOUCHED in the copy: buffer hits plus reads (``pg_stat_database``
``blks_hit + blks_read`` for the database; ``pg_statio_user_tables`` heap and index pages per
table; ``pg_statio_user_indexes`` per index). It does not depend on the machine's speed or
on what the cache held. Statistics are read only after every backend of the measured
connections has exited (a backend flushes its counters at exit; while it lives, at most
once a second), and re-read until two reads agree. The database totals are read from
another database, so the reader adds nothing to them but its own few catalog pages in the
copy (measured by an empty interval first and printed as ``reader``).

What "pages" include: every buffer request of a relation, its visibility-map fork too. An
index-only scan checks the visibility map for every index tuple and keeps one map page
pinned; a map page covers 32,672 heap pages (255 MiB), so where the heap is larger and the
index order jumps between heap pages (uuid keys), nearly every tuple re-pins a map page and
counts as a heap page of the table. At L the sessions (93,297 pages: 3 map pages) cost the
orphan step's merge about 0.64 "heap pages" per session read (1 - sum of the squared shares
of the 3 map pages) with no heap fetch at all: 3.2M of its 3.3M pages, measured with
``EXPLAIN (ANALYZE, BUFFERS)`` of a full index-only scan of the sessions' primary key after
the vacuum (Heap Fetches: 0, shared hit 3,197,010 for an index of 19,553 pages). At S (18,661
pages, one map page) the effect is absent.

With no ``--admin-url`` (or ``$SESSION_CLEANUP_BENCH_ADMIN_URL``) an embedded PostgreSQL 16
is started for the run, and autovacuum is turned off on it (``ALTER SYSTEM``) so that no
autovacuum worker reads the copies during a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from session_cleanup_dev.seed import parse_scale

from benchmarks import databases
from benchmarks.approaches import JOB_ORDER, _limit_sql

APP_TABLES = ("after_hours_sessions", "after_hours_declines", "device_fingerprints", "users")
SHORT = {
    "after_hours_sessions": "sessions",
    "after_hours_declines": "declines",
    "device_fingerprints": "fingerprints",
    "users": "users",
}
APP_NAME = "bench-steady-night"


@dataclass
class Pages:
    """Pages touched over one interval: the database's, and per table and index."""

    database: int = 0
    tables: dict[str, dict[str, int]] = field(default_factory=dict)  # table -> heap/idx
    indexes: dict[str, int] = field(default_factory=dict)

    def minus(self, before: Pages) -> Pages:
        return Pages(
            database=self.database - before.database,
            tables={
                name: {k: v - before.tables.get(name, {}).get(k, 0) for k, v in kinds.items()}
                for name, kinds in self.tables.items()
            },
            indexes={k: v - before.indexes.get(k, 0) for k, v in self.indexes.items()},
        )

    def app(self) -> int:
        return sum(sum(kinds.values()) for kinds in self.tables.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "database": self.database,
            "tables": self.tables,
            "indexes": self.indexes,
            "other": self.database - self.app(),
        }


class Meter:
    """Reads a database's page counters once its measured backends have all exited."""

    def __init__(self, admin_url: str, url: str) -> None:
        self.name = databases.database_of(url)
        self.admin = psycopg.connect(databases.plain(admin_url), autocommit=True)
        self.reader = psycopg.connect(url, autocommit=True, application_name=f"{APP_NAME} meter")
        self.reader_pid = int(self.reader.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
        # Resolved once: a read of pg_statio_user_tables scans pg_index for every table (some
        # 3,000 catalog pages), which would land in the database's count at the next flush.
        self.relations = [
            (int(oid), str(table), str(name), kind)
            for oid, table, name, kind in self.reader.execute(
                "SELECT c.oid, c.relname, c.relname, 'heap' FROM pg_class c"
                " WHERE c.relname = ANY(%s) AND c.relnamespace = 'public'::regnamespace"
                " UNION ALL SELECT i.indexrelid, c.relname, ic.relname, 'idx' FROM pg_index i"
                " JOIN pg_class c ON c.oid = i.indrelid JOIN pg_class ic ON ic.oid = i.indexrelid"
                " WHERE c.relname = ANY(%s) AND c.relnamespace = 'public'::regnamespace",
                (list(APP_TABLES), list(APP_TABLES)),
            ).fetchall()
        ]

    def close(self) -> None:
        self.reader.close()
        self.admin.close()

    def _quiet(self, timeout_s: float = 30.0) -> None:
        """Wait until no backend but the reader is connected to the database."""
        deadline = time.monotonic() + timeout_s
        while True:
            row = self.admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> %s",
                (self.name, self.reader_pid),
            ).fetchone()
            if row is not None and row[0] == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"backends still connected to {self.name}")
            time.sleep(0.05)

    def _read(self) -> Pages:
        row = self.admin.execute(
            "SELECT blks_hit + blks_read FROM pg_stat_database WHERE datname = %s",
            (self.name,),
        ).fetchone()
        assert row is not None
        counts: dict[int, int] = dict(
            self.reader.execute(
                "SELECT o, pg_stat_get_blocks_fetched(o) FROM unnest(%s::oid[]) AS o",
                ([oid for oid, *_ in self.relations],),
            ).fetchall()
        )
        tables: dict[str, dict[str, int]] = {t: {"heap": 0, "idx": 0} for t in APP_TABLES}
        indexes: dict[str, int] = {}
        for oid, table, name, kind in self.relations:
            tables[table][kind] += int(counts[oid])
            if kind == "idx":
                indexes[name] = int(counts[oid])
        return Pages(database=int(row[0]), tables=tables, indexes=indexes)

    def read(self) -> Pages:
        """The counters, once all measured backends have exited and two reads agree."""
        self._quiet()
        last = self._read()
        for _ in range(50):
            time.sleep(0.2)
            again = self._read()
            if again.tables == last.tables and abs(again.database - last.database) <= 200:
                return again
            last = again
        raise RuntimeError("page counters did not settle")

    def reset(self) -> None:
        self.reader.execute("SELECT pg_stat_reset()")

    @contextmanager
    def interval(self, out: dict[str, Any], label: str) -> Iterator[None]:
        before = self.read()
        started = time.monotonic()
        yield
        wall = time.monotonic() - started
        pages = self.read().minus(before)
        out[label] = {**pages.as_dict(), "wall_s": round(wall, 3)}


# --- what each side runs --------------------------------------------------------------------


def limit_step(url: str, step: str, cutoff: datetime) -> dict[str, Any]:
    """The limit's one statement for ``step``, on a connection of its own."""
    sql = dict(_limit_sql())[step]
    with psycopg.connect(url, application_name=APP_NAME) as conn:
        rows = conn.execute(sql, {"t": cutoff}).rowcount
        conn.commit()
    return {"rows": rows}


def job_step(url: str, step: str, cutoff: datetime) -> dict[str, Any]:
    """What the op runs against the app database: its checks, the step, the backlog count.

    Mirrors running.run_step and assets.report_step with ``as_of`` set (so no ``now()``),
    without the Dagster event log, the advisory lock's connection and the topology probe
    (neither of which reads a page of the app's tables).
    """
    from session_cleanup_dagster import assets, prerequisites, steps
    from session_cleanup_dagster.resources import make_engine

    engine = make_engine(url, application_name=APP_NAME)
    try:
        with engine.connect() as conn:
            prerequisites.check(conn, step, "public")
        result = getattr(steps, step)(engine, cutoff)
        left = assets.backlog_left(engine, step, cutoff)
    finally:
        engine.dispose()
    return {
        "rows": result.changed,
        "batches": result.batches,
        "backlog_rows": left.rows,
        "backlog_method": left.method,
    }


def job_step_only(url: str, step: str, cutoff: datetime) -> dict[str, Any]:
    """The step function alone (to split the op's cost into step and backlog count)."""
    from session_cleanup_dagster import steps
    from session_cleanup_dagster.resources import make_engine

    engine = make_engine(url, application_name=APP_NAME)
    try:
        result = getattr(steps, step)(engine, cutoff)
    finally:
        engine.dispose()
    return {"rows": result.changed, "batches": result.batches}


def backlog_only(url: str, step: str, cutoff: datetime) -> dict[str, Any]:
    from session_cleanup_dagster import assets
    from session_cleanup_dagster.resources import make_engine

    engine = make_engine(url, application_name=APP_NAME)
    try:
        left = assets.backlog_left(engine, step, cutoff)
    finally:
        engine.dispose()
    return {"backlog_rows": left.rows, "backlog_method": left.method}


Runner = Callable[[str, str, datetime], dict[str, Any]]


def night(meter: Meter, url: str, cutoff: datetime, runner: Runner) -> dict[str, Any]:
    """Each step in the job's order, each measured on its own; and the whole night."""
    out: dict[str, Any] = {}
    facts: dict[str, Any] = {}
    meter.reset()
    total = meter.read()
    for step in JOB_ORDER:
        with meter.interval(out, step):
            facts[step] = runner(url, step, cutoff)
        out[step].update(facts[step])
    out["night"] = meter.read().minus(total).as_dict()
    return out


def split_job(meter: Meter, url: str, cutoff: datetime) -> dict[str, Any]:
    """The job's night split in step function and backlog count, per step."""
    out: dict[str, Any] = {}
    meter.reset()
    for step in JOB_ORDER:
        part: dict[str, Any] = {}
        with meter.interval(part, "step"):
            part["step_facts"] = job_step_only(url, step, cutoff)
        with meter.interval(part, "backlog"):
            part["backlog_facts"] = backlog_only(url, step, cutoff)
        out[step] = part
    return out


# --- the state at the end -------------------------------------------------------------------


def checksum(url: str) -> dict[str, str]:
    """Every row of the four tables, order-free: count and a sum of row hashes, per table."""
    sums = {}
    with psycopg.connect(url) as conn:
        for table in APP_TABLES:
            row = conn.execute(
                f"SELECT count(*), sum(hashtextextended(x::text, 0)::numeric) FROM {table} x"
            ).fetchone()
            assert row is not None
            sums[table] = f"{row[0]}:{row[1]}"
    return sums


# --- the report -----------------------------------------------------------------------------


def _cell(pages: dict[str, Any], table: str, kind: str) -> int:
    return int(pages["tables"].get(table, {}).get(kind, 0))


def table_lines(limit: dict[str, Any], job: dict[str, Any], title: str) -> list[str]:
    lines = [
        f"### {title}",
        "",
        "| step | table | limit heap | limit idx | job heap | job idx | job/limit |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for step in (*JOB_ORDER, "night"):
        a, b = limit[step], job[step]
        for table in APP_TABLES:
            la, li = _cell(a, table, "heap"), _cell(a, table, "idx")
            ja, ji = _cell(b, table, "heap"), _cell(b, table, "idx")
            if la + li + ja + ji == 0:
                continue
            lines.append(
                f"| {step} | {SHORT[table]} | {la:,} | {li:,} | {ja:,} | {ji:,} "
                f"| {_ratio(ja + ji, la + li)} |"
            )
        lines.append(
            f"| {step} | **database** (incl. catalog, temp) | {a['database']:,} | | "
            f"{b['database']:,} | | **{_ratio(b['database'], a['database'])}** |"
        )
    return lines


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.2f}x" if b else ("-" if a == 0 else "inf")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.steady_night", description=__doc__)
    parser.add_argument("--scale", default="S", help="XS (10k users), S (200k), L (1M), or N")
    parser.add_argument(
        "--admin-url", default=os.environ.get(databases.ADMIN_URL_ENV) or None, help="server"
    )
    parser.add_argument("--anchor", default=None, help="T1 (ISO); default: this hour, UTC")
    parser.add_argument("--json", type=Path, default=None, help="write the results here too")
    parser.add_argument(
        "--split", action="store_true", help="also split the job's steps: step vs backlog count"
    )
    parser.add_argument(
        "--declines-index",
        choices=sorted(DECLINES_INDEXES),
        default="none",
        help="an index the app may have on after_hours_declines.created_at, made before T0",
    )
    args = parser.parse_args(argv)
    scale, users = args.scale.upper(), parse_scale(args.scale)
    t1 = (
        datetime.fromisoformat(args.anchor)
        if args.anchor
        else datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    )
    t0 = t1 - timedelta(days=1)
    results: dict[str, Any] = {"scale": scale, "users": users, "t0": t0, "t1": t1}
    with databases.admin_server(args.admin_url) as admin_url:
        if not args.admin_url:
            with psycopg.connect(databases.plain(admin_url), autocommit=True) as conn:
                conn.execute("ALTER SYSTEM SET autovacuum = off")
                conn.execute("SELECT pg_reload_conf()")
        server = databases.Server(admin_url)
        try:
            index = DECLINES_INDEXES[args.declines_index]
            results.update(run(server, scale, users, t0, t1, split=args.split, index=index))
        finally:
            server.drop_all()
    lines = [
        f"## Steady night at {scale} ({users:,} users): T0 {t0.isoformat()}, T1 {t1.isoformat()}",
        "",
        f"index on after_hours_declines.created_at: {args.declines_index}",
        "",
        f"reader's own pages per interval (an empty interval): {results['reader']}",
        "",
        *table_lines(results["limit"], results["job"], "Pages touched at T1 (due rows)"),
        "",
        *table_lines(results["limit_zero"], results["job_zero"], "A second run at T1 (zero rows)"),
        "",
        "rows: "
        + ", ".join(
            f"{s} limit {results['limit'][s]['rows']} job {results['job'][s]['rows']}"
            for s in JOB_ORDER
        ),
        "backlog counts after the job's steps: "
        + "; ".join(
            f"{s} {results['job'][s]['backlog_rows']} ({results['job'][s]['backlog_method']})"
            for s in JOB_ORDER
        ),
        "batches: " + ", ".join(f"{s} {results['job'][s]['batches']}" for s in JOB_ORDER),
        "wall s: "
        + ", ".join(
            f"{s} limit {results['limit'][s]['wall_s']} job {results['job'][s]['wall_s']}"
            for s in JOB_ORDER
        ),
        f"end states equal: {results['same_state']}; contract: {results['verify']}",
    ]
    if "split" in results:
        lines.append("")
        lines.append("job split (pages, app tables + catalog): step function | backlog count")
        for step, part in results["split"].items():
            lines.append(
                f"  {step}: {part['step']['database']:,} | {part['backlog']['database']:,}"
                f" ({part['backlog_facts']['backlog_method']})"
            )
    text = "\n".join(lines)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, default=str, indent=1) + "\n")


# What --declines-index makes on the template, before T0: the app's choice, never the job's.
DECLINES_INDEXES: dict[str, str | None] = {
    "none": None,
    "btree": "CREATE INDEX declines_created_at_idx ON after_hours_declines (created_at)",
    "brin": "CREATE INDEX declines_created_at_brin ON after_hours_declines USING brin (created_at)",
}


def run(
    server: databases.Server,
    scale: str,
    users: int,
    t0: datetime,
    t1: datetime,
    *,
    split: bool,
    index: str | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    started = time.monotonic()
    template, _ = databases.seed_template(server, scale, users, anchor=t1)
    template_url = databases.url_of(server.admin_url, template)
    if index is not None:
        with psycopg.connect(template_url, autocommit=True) as conn:
            conn.execute(index)
    # The night before: the limit at T0, then what autovacuum would have done since.
    night_before = {step: limit_step(template_url, step, t0) for step in JOB_ORDER}
    databases.vacuum(template_url, checkpoint=True)
    out["t0_rows"] = {step: facts["rows"] for step, facts in night_before.items()}
    print(f"seeded and cleaned at T0 in {time.monotonic() - started:.0f} s: {out['t0_rows']}")
    before = databases.expected_state(template_url, t1)
    out["due_at_t1"] = before
    print(f"due at T1: {before}")
    copies = {"limit": server.create("limit", template), "job": server.create("job", template)}
    if split:
        copies["split"] = server.create("split", template)
    urls = {k: databases.url_of(server.admin_url, v) for k, v in copies.items()}
    meters = {k: Meter(server.admin_url, u) for k, u in urls.items()}
    try:
        meter = meters["limit"]
        meter.reset()
        empty: dict[str, Any] = {}
        with meter.interval(empty, "empty"):
            pass
        out["reader"] = empty["empty"]["database"]
        out["limit"] = night(meter, urls["limit"], t1, limit_step)
        out["job"] = night(meters["job"], urls["job"], t1, job_step)
        out["limit_zero"] = night(meter, urls["limit"], t1, limit_step)
        out["job_zero"] = night(meters["job"], urls["job"], t1, job_step)
        if split:
            out["split"] = split_job(meters["split"], urls["split"], t1)
    finally:
        for m in meters.values():
            m.close()
    sums = {k: checksum(urls[k]) for k in ("limit", "job")}
    out["same_state"] = sums["limit"] == sums["job"]
    if not out["same_state"]:
        out["checksums"] = sums
    verdicts = {k: databases.verify(urls[k], t1, before, 0, [])["ok"] for k in ("limit", "job")}
    out["verify"] = verdicts
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
