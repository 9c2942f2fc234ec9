"""Turns a results dict into figures: a summary per approach, Markdown tables, PNG plots."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benchmarks.approaches import STEPS, label, parse_approach

TARGET_RATIO = 0.8
TARGET_XACT_S = 0.25
TARGET_P99_FACTOR = 2.0
TARGET_RSS = 0.10
TARGET_SCALING = 5.5
TARGET_OVERHEAD = 1.5


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per scale and approach: medians over rounds, rows/s and the ratio to the limit."""
    out: dict[str, Any] = {}
    for scale, entry in results["scales"].items():
        per: dict[str, Any] = {}
        # In the order they ran: old, limit, job, steps, and any of them at another commit.
        for approach in dict.fromkeys(r["approach"] for r in entry["runs"]):
            runs = [r for r in entry["runs"] if r["approach"] == approach]
            steps = {}
            for step in STEPS:
                done = all(r["steps"][step]["done"] for r in runs)
                wall = _median([r["steps"][step]["wall_s"] for r in runs])
                rows = runs[0]["due_before"][step]
                steps[step] = {
                    "done": done,
                    "wall_s": wall,
                    "rows": rows,
                    "rows_per_s": rows / wall if done and wall else None,
                    # The longest of any round, like the longest transaction.
                    "longest_batch_s": max(
                        (b for r in runs if (b := r["steps"][step].get("longest_batch_s"))),
                        default=None,
                    ),
                }
            per[approach] = {
                "steps": steps,
                "longest_xact_s": max(r["longest_xact_s"] for r in runs),
                "peak_rss_mib": max(r["process"]["peak_rss_mib"] for r in runs),
                "app_p50_ms": _median([r["app"]["p50_ms"] for r in runs]),
                "app_p99_ms": max(r["app"]["p99_ms"] or 0 for r in runs),
                "app_max_ms": max(r["app"]["max_ms"] or 0 for r in runs),
                "app_over_1s": sum(r["app"]["over_1s"] for r in runs),
                # Older results have no lock-wait sampling: None, not zero.
                "app_lock_waits_over_1s": (
                    sum(r["app"]["lock_waits_over_1s"] for r in runs)
                    if all("lock_waits_over_1s" in r["app"] for r in runs)
                    else None
                ),
                "verified": all(r["verified"]["ok"] for r in runs),
                "rounds": len(runs),
            }
            if parse_approach(approach)[0] == "job":
                # Right after the cleanup, and again once the copy is vacuumed.
                for when in ("zero_row", "zero_row_vacuumed"):
                    zero = [z["_job"]["wall_s"] for r in runs for z in r.get(f"{when}_runs", [])]
                    per[approach][f"{when}_s"] = _median(zero)
                    floor = [
                        sum(z[step]["wall_s"] for step in STEPS)
                        for r in runs
                        for z in r.get(f"{when}_limit_runs", [])
                    ]
                    per[approach][f"{when}_limit_s"] = _median(floor)
                per[approach]["job_wall_s"] = _median([r["job"]["wall_s"] for r in runs])
        limit = per.get("limit")
        for data in per.values():
            for step, s in data["steps"].items():
                base = limit["steps"][step]["rows_per_s"] if limit else None
                s["ratio"] = s["rows_per_s"] / base if s["rows_per_s"] and base else None
        out[scale] = {
            "approaches": per,
            "idle": entry["idle"],
            # Older results have no busy baseline.
            "busy": entry.get("busy"),
            "users": entry["users"],
        }
    return out


def targets(summary: dict[str, Any], results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each of the issue's targets, for this project's job (and step functions), met or not."""
    rows: list[dict[str, Any]] = []
    for scale, data in summary.items():
        idle_p99 = data["idle"]["p99_ms"] or 0.0
        for approach in ("job", "steps"):
            a = data["approaches"].get(approach)
            if a is None:
                continue
            for step in STEPS:
                ratio = a["steps"][step]["ratio"]
                rows.append(
                    _row(f"{scale} {approach} {step}: rows/s vs limit", ratio, TARGET_RATIO, ">=")
                )
            rows.append(
                _row(
                    f"{scale} {approach}: longest transaction (s)",
                    a["longest_xact_s"],
                    TARGET_XACT_S,
                    "<=",
                )
            )
            factor = a["app_p99_ms"] / idle_p99 if idle_p99 else None
            rows.append(
                _row(f"{scale} {approach}: app p99 / idle p99", factor, TARGET_P99_FACTOR, "<=")
            )
            rows.append(_row(f"{scale} {approach}: app writes over 1 s", a["app_over_1s"], 0, "<="))
            rows.append(
                _row(
                    f"{scale} {approach}: app lock waits over 1 s (sampled)",
                    a.get("app_lock_waits_over_1s"),
                    0,
                    "<=",
                )
            )
    scales = list(summary)
    if "S" in summary and "L" in summary:
        s_job, l_job = summary["S"]["approaches"].get("job"), summary["L"]["approaches"].get("job")
        if s_job and l_job:
            growth = l_job["peak_rss_mib"] / s_job["peak_rss_mib"] - 1
            rows.append(_row("run worker peak RSS, L vs S (growth)", growth, TARGET_RSS, "<="))
            for step in STEPS:
                ws, wl = s_job["steps"][step]["wall_s"], l_job["steps"][step]["wall_s"]
                rows.append(
                    _row(f"time L / time S: {step}", wl / ws if ws else None, TARGET_SCALING, "<=")
                )
    trivial = results.get("trivial", {}).get("in_process", [])
    trivial_s = _median([t["_job"]["wall_s"] for t in trivial])
    for scale in scales:
        job = summary[scale]["approaches"].get("job")
        for when, what in (
            ("zero_row", "right after the cleanup"),
            ("zero_row_vacuumed", "after VACUUM"),
        ):
            if job and job.get(f"{when}_s") and trivial_s:
                rows.append(
                    _row(
                        f"{scale}: zero-row run {what} / trivial 3-op job (in process)",
                        job[f"{when}_s"] / trivial_s,
                        TARGET_OVERHEAD,
                        "<=",
                    )
                )
    return rows


def _row(what: str, value: float | None, target: float, sense: str) -> dict[str, Any]:
    met = None if value is None else (value >= target if sense == ">=" else value <= target)
    return {"what": what, "value": value, "target": f"{sense} {target}", "met": met}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(results: dict[str, Any], summary: dict[str, Any], goals: list[dict[str, Any]]) -> str:
    lines = [
        f"PostgreSQL {results['server_version']} "
        f"({', '.join(f'{k} {v}' for k, v in results['server_settings'].items())}); "
        f"cutoff {results['cutoff']}; guard per old statement {results['guard_s']:.0f} s.",
        "",
    ]
    for scale, data in summary.items():
        idle = data["idle"]
        lines += [
            f"### Scale {scale} ({data['users']:,} users)",
            "",
            "| approach | " + " | ".join(STEPS) + " | longest transaction | client peak RSS "
            "| app p50 / p99 / max (ms) | app writes > 1 s | end state |",
            "|---|" + "---|" * (len(STEPS) + 5),
        ]
        for approach, a in data["approaches"].items():
            cells = []
            for step in STEPS:
                s = a["steps"][step]
                if not s["done"]:
                    cells.append(f"did not finish in {results['guard_s']:.0f} s")
                    continue
                ratio = f", {s['ratio']:.2f}× limit" if s["ratio"] is not None else ""
                cells.append(
                    f"{s['wall_s']:.2f} s ({s['rows']:,} rows, {s['rows_per_s']:,.0f}/s{ratio})"
                )
            xact = f"{a['longest_xact_s'] * 1000:.0f} ms"
            batch = max((a["steps"][s]["longest_batch_s"] or 0) for s in STEPS)
            if batch:
                xact += f" (longest batch {batch * 1000:.0f} ms)"
            lines.append(
                f"| {label(approach)} | "
                + " | ".join(cells)
                + f" | {xact} | {a['peak_rss_mib']:.0f} MiB"
                + f" | {_fmt(a['app_p50_ms'], 1)} / {_fmt(a['app_p99_ms'], 1)} / "
                f"{_fmt(a['app_max_ms'], 0)} | {a['app_over_1s']} | "
                + ("verified" if a["verified"] else "**FAILED**")
                + " |"
            )
        baselines = [("app at idle (no cleanup)", idle)]
        busy = data.get("busy")
        if busy:
            baselines.append(("app while one backend only computes (no cleanup)", busy))
        for name, app in baselines:
            lines.append(
                f"| {name} | | | | | | {_fmt(app['p50_ms'], 1)} / {_fmt(app['p99_ms'], 1)} / "
                f"{_fmt(app['max_ms'], 0)} | {app['over_1s']} | |"
            )
        lines.append("")
        if busy and busy["p99_ms"] and idle["p99_ms"]:
            lines += [
                "While one backend only computes (`generate_series`, back to back: no table, no "
                f"lock, no WAL), the app's p99 is {busy['p99_ms']:.1f} ms, "
                f"{busy['p99_ms'] / idle['p99_ms']:.2f}× its idle p99: what any work that keeps "
                "one core busy costs the app on this machine, before a cleanup adds anything.",
                "",
            ]
        job = data["approaches"].get("job")
        if job:
            line = f"The job end to end (Dagster, in process): {job['job_wall_s']:.2f} s"
            if job.get("zero_row_s") is not None:
                line += (
                    f"; a zero-row run of it, right after on the same copy: "
                    f"{_fmt(job['zero_row_s'])} s (the limit's three statements there, Dagster "
                    f"aside: {_fmt(job.get('zero_row_limit_s'))} s)"
                )
            if job.get("zero_row_vacuumed_s") is not None:
                line += (
                    f"; after a VACUUM (ANALYZE) of that copy: {_fmt(job['zero_row_vacuumed_s'])} s"
                    f" (the limit's: {_fmt(job.get('zero_row_vacuumed_limit_s'))} s)"
                )
            lines += [line + ".", ""]
    trivial = results.get("trivial", {})
    if trivial:
        parts = []
        for executor, runs in trivial.items():
            wall = _median([r["_job"]["wall_s"] for r in runs])
            parts.append(f"{executor.replace('_', ' ')} {_fmt(wall)} s")
        lines += ["A trivial 3-op Dagster job, run the same way: " + "; ".join(parts) + ".", ""]
    lines += ["### Targets", "", "| target | value | goal | met |", "|---|---|---|---|"]
    for g in goals:
        met = {True: "yes", False: "**no**", None: "–"}[g["met"]]
        lines.append(f"| {g['what']} | {_fmt(g['value'])} | {g['target']} | {met} |")
    return "\n".join(lines) + "\n"


def plots(summary: dict[str, Any], results: dict[str, Any], out: Path, stem: str) -> list[Path]:
    """rows/s by approach and scale; the app's latency over time, old statements vs ours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    scales = list(summary)
    approaches = list(dict.fromkeys(a for s in scales for a in summary[s]["approaches"]))
    fig, axes = plt.subplots(1, len(STEPS), figsize=(5 * len(STEPS), 4.2), squeeze=False)
    width = 0.8 / max(1, len(approaches))
    for i, step in enumerate(STEPS):
        ax = axes[0][i]
        for j, approach in enumerate(approaches):
            values = []
            for scale in scales:
                a = summary[scale]["approaches"].get(approach)
                values.append((a["steps"][step]["rows_per_s"] or 0) if a else 0)
            xs = [k + j * width for k in range(len(scales))]
            ax.bar(xs, values, width, label=approach)
        ax.set_xticks([k + width * (len(approaches) - 1) / 2 for k in range(len(scales))])
        ax.set_xticklabels(scales)
        ax.set_title(step)
        ax.set_ylabel("rows/s")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Rows per second by approach and scale (0 = did not finish)")
    fig.tight_layout()
    path = out / f"{stem}_rows_per_s.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)

    for scale in scales:
        runs = {
            r["approach"]: r
            for r in results["scales"][scale]["runs"]
            if r["approach"] in ("old", "job") and r["round"] == 1
        }
        if not runs:
            continue
        fig, ax = plt.subplots(figsize=(10, 4))
        for approach, run in runs.items():
            series = run["app"]["series"]
            ax.plot([p[0] for p in series], [p[1] for p in series], label=label(approach), lw=0.8)
        ours = [p[0] for p in runs["job"]["app"]["series"]] if "job" in runs else []
        if ours:
            # The old statements run for minutes; show the window our job ran in, and more.
            ax.set_xlim(0, max(30.0, 3 * max(ours)))
        entry = results["scales"][scale]
        for baseline, style, line_name in (
            ("idle", "--", "idle p99"),
            ("busy", ":", "p99 while one backend only computes"),
        ):
            p99 = (entry.get(baseline) or {}).get("p99_ms")
            if p99:
                ax.axhline(p99, color="grey", ls=style, lw=0.8, label=line_name)
        ax.set_yscale("log")
        ax.set_xlabel("seconds since the cleanup started (the old statements go on beyond)")
        ax.set_ylabel("worst app write latency per 0.25 s (ms)")
        ax.set_title(f"App latency during cleanup, scale {scale}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{stem}_app_latency_{scale}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
