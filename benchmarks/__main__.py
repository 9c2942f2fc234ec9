"""``python -m benchmarks`` (or ``./run bench``): seed, run every approach, verify, report.

Example: ``./run bench --scales S,L`` writes benchmarks/results/S_L.{json,md} and plots.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from session_cleanup_dev.seed import parse_scale

from benchmarks import databases, report, runner
from benchmarks.approaches import APPROACHES, parse_approach


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--scales", default="S", help="comma-separated: XS (10k users), S (200k), L (1M), or N"
    )
    parser.add_argument(
        "--approaches",
        default=",".join(APPROACHES),
        help=f"comma-separated subset of {','.join(APPROACHES)}; NAME@REF runs NAME with the "
        "code of git commit REF (a worktree made for the run), so one run compares a change "
        "with the code before it, e.g. job,job@HEAD~3",
    )
    parser.add_argument(
        "--admin-url",
        default=os.environ.get(databases.ADMIN_URL_ENV) or None,
        help=f"superuser URL of the server to use (env {databases.ADMIN_URL_ENV}); the "
        "benchmark creates and drops its own databases there. Default: an embedded "
        "PostgreSQL 16 started for this run and stopped afterwards",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results"), help="output directory"
    )
    parser.add_argument("--name", default=None, help="file name stem (default: the scales)")
    parser.add_argument(
        "--guard-s", type=float, default=600.0, help="statement_timeout of each old statement"
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds of all approaches")
    parser.add_argument("--idle-s", type=float, default=10.0, help="idle app baseline length")
    parser.add_argument(
        "--overhead-runs", type=int, default=3, help="zero-row and trivial job runs (0: none)"
    )
    parser.add_argument(
        "--no-multiprocess", action="store_true", help="skip the multiprocess-executor figure"
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "--report-only",
        type=Path,
        default=None,
        help="rewrite the Markdown and plots from this results JSON; run nothing",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.report_only is not None:
        results = json.loads(args.report_only.read_text())
        stem = args.report_only.stem
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{stem}.md").write_text(
            report.markdown(results, results["summary"], results["targets"])
        )
        report.plots(results["summary"], results, args.out, stem)
        return 0
    scales = [(s.strip().upper(), parse_scale(s)) for s in args.scales.split(",") if s.strip()]
    approaches = [a.strip() for a in args.approaches.split(",") if a.strip()]
    for approach in approaches:
        try:
            parse_approach(approach)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    # A SIGTERM (``timeout``, ``kill``) unwinds like Ctrl-C, so the runner's ``finally`` drops
    # the benchmark's databases (and stops an embedded server) instead of leaving them behind.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with databases.admin_server(args.admin_url) as admin_url:
        options = runner.Options(
            scales=scales,
            approaches=approaches,
            admin_url=admin_url,
            guard_s=args.guard_s,
            repeat=args.repeat,
            idle_s=args.idle_s,
            overhead_runs=args.overhead_runs,
            multiprocess=not args.no_multiprocess,
        )
        results = runner.run(options)
    summary = report.summarize(results)
    goals = report.targets(summary, results)
    results["summary"] = summary
    results["targets"] = goals
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or "_".join(s for s, _ in scales)
    (args.out / f"{stem}.json").write_text(
        json.dumps(results, separators=(",", ":"), default=str) + "\n"
    )
    text = report.markdown(results, summary, goals)
    (args.out / f"{stem}.md").write_text(text)
    if not args.no_plots:
        report.plots(summary, results, args.out, stem)
    sys.stdout.write(text)
    verified = all(a["verified"] for s in summary.values() for a in s["approaches"].values())
    return 0 if verified else 1


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
